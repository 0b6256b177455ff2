"""A run folder: what it holds (``RunSpec``) and the one way it becomes a model (``load_run``).

Every command that opens a run (generate, chat, eval, serve, export, merge, finetune,
``lmforge.load``) goes through here, so the layout of a run folder is read in one place:

    runs/NAME/config.yaml         the model section (model | encoder | seq2seq) and how it was made
    runs/NAME/tokenizer.json      (+ tokenizer_config.json, chat_template.jinja when it has them)
    runs/NAME/checkpoints/step_N  weights (one safetensors file, or shards), meta.json

The keys of config.yaml that decide the kind, as pretrain, finetune, merge and import write them:
``task: classify`` (+ ``labels``, ``max_len``) is a classifier over the ``encoder`` section;
``objective: mlm`` a masked-LM encoder; ``objective: seq2seq`` an encoder-decoder over the
``seq2seq`` section; anything else (``objective: clm`` or none: imports, fine-tunes, merges)
a decoder over the ``model`` section. ``eos_id`` (imports) overrides the tokenizer's
<|endoftext|>.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from tokenizers import Tokenizer
from torch import nn

from lmforge.checkpoint import (
    latest_checkpoint,
    open_weights,
    read_meta,
    read_weights,
    stream_model_weights,
)
from lmforge.config import ConfigError, UserError, from_dict, load_yaml, to_dict
from lmforge.data.classify import encoder_tokenizer
from lmforge.data.tokenizer import EOS_TOKEN, load_tokenizer
from lmforge.infer.chat import ChatTemplate
from lmforge.infer.generate import decode_layout
from lmforge.infer.quant import Quant, check_quant, load_quantized
from lmforge.interop.hf import CONFIG_FILE, TOKENIZER_FILE, load_hf_encoder
from lmforge.models.decoder import Decoder, DecoderConfig
from lmforge.models.encoder import (
    Encoder,
    EncoderConfig,
    EncoderForClassification,
    EncoderForMaskedLM,
)
from lmforge.models.seq2seq import Seq2Seq, Seq2SeqConfig
from lmforge.utils.io import atomic_write_bytes, atomic_write_text

Kind = Literal["decoder", "encoder", "classifier", "seq2seq"]
ModelConfig = DecoderConfig | EncoderConfig | Seq2SeqConfig
CONFIG_YAML = "config.yaml"
# A LoRA/QLoRA fine-tune keeps its adapter beside the merged weights (`lmforge merge` reads it).
ADAPTER_FILE, ADAPTER_INFO = "adapter.safetensors", "adapter.json"
# Tokenizer files a derived run (fine-tune, merge) copies from its base, when the base has them.
SIDE_FILES = ("tokenizer_config.json", "special_tokens_map.json")


def _kinds() -> dict[Kind, tuple[str, type[ModelConfig], type[nn.Module]]]:
    # kind -> (config.yaml section, config class, model class); built per call: no mutable global.
    return {
        "decoder": ("model", DecoderConfig, Decoder),
        "encoder": ("encoder", EncoderConfig, EncoderForMaskedLM),
        "classifier": ("encoder", EncoderConfig, EncoderForClassification),
        "seq2seq": ("seq2seq", Seq2SeqConfig, Seq2Seq),
    }


@dataclass(frozen=True)
class RunSpec:
    """What a run folder holds, read from its config.yaml and checkpoint meta (no weights)."""

    kind: Kind
    model_cfg: ModelConfig
    run_dir: Path
    checkpoint: Path
    tokenizer: Path
    step: int
    eos_id: int | None
    """Token that ends a text: config.yaml's eos_id (imports), else <|endoftext|> (encoders: None)."""
    bos_id: int | None = None
    labels: tuple[str, ...] = ()
    """Classifiers: the label names, in the head's order."""
    max_len: int | None = None
    """Classifiers: tokens per text in training (longer texts are cut)."""
    eos_ids: tuple[int, ...] = ()
    """Every token that ends a text (Llama 3 has several): config.yaml's eos_ids, else eos_id."""

    @property
    def config_file(self) -> Path:
        """The run's config.yaml (for error messages)."""
        return self.run_dir / CONFIG_YAML


def find_run_dir(path: Path) -> tuple[Path, Path]:
    """(run dir, checkpoint dir) for a run folder or one of its checkpoint folders."""
    if not path.exists():
        raise UserError(f"{path}: no such run or checkpoint; train one with `lmforge pretrain`")
    if (path / "meta.json").is_file():
        run_dir = path.parent.parent
        ckpt = path
    else:
        run_dir = path
        found = latest_checkpoint(path)
        if found is None:
            raise UserError(f"{path}: has no complete checkpoint; is it a run folder "
                            "(runs/<name>) of a run that saved at least once?")
        ckpt = found
    if not (run_dir / CONFIG_YAML).is_file():
        raise UserError(f"{run_dir}: config.yaml is missing, so the model cannot be rebuilt")
    return run_dir, ckpt


def run_kind(saved: dict[str, Any], where: Path) -> Kind:
    """The kind of run a parsed config.yaml describes; UserError for an unknown objective."""
    if saved.get("task") == "classify":
        return "classifier"
    objective = saved.get("objective", "clm")
    kinds: dict[str, Kind] = {"clm": "decoder", "mlm": "encoder", "seq2seq": "seq2seq"}
    if objective not in kinds:
        raise UserError(f"{where}: objective {objective!r} is not one lmforge can load "
                        f"(clm, mlm, seq2seq)")
    return kinds[objective]


def _token_id(saved: dict[str, Any], key: str, where: Path) -> int | None:
    value = saved.get(key)
    if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
        raise UserError(f"{where}: {key} must be a token id or null, got {value!r}")
    return value


def read_run_spec(path: str | Path) -> RunSpec:
    """The spec of a run folder (its latest checkpoint) or of one checkpoint folder."""
    run_dir, ckpt = find_run_dir(Path(path))
    where = run_dir / CONFIG_YAML
    saved = load_yaml(where)
    kind = run_kind(saved, where)
    section, config_cls, _ = _kinds()[kind]
    if not isinstance(saved.get(section), dict):
        raise UserError(f"{where}: has no {section} section, so the {kind} cannot be rebuilt")
    try:
        mcfg = from_dict(config_cls, saved[section], section)
    except ConfigError as e:
        raise UserError(f"{where}: {e}") from None
    tok_path = run_dir / TOKENIZER_FILE
    if "eos_id" in saved:
        eos_id = _token_id(saved, "eos_id", where)
    elif kind in ("decoder", "seq2seq"):
        eos_id = load_tokenizer(tok_path).token_to_id(EOS_TOKEN)
    else:
        eos_id = None
    labels, max_len = _classifier_fields(saved, mcfg, kind, where)
    step = int(read_meta(ckpt).get("step", 0))
    eos_ids = saved.get("eos_ids") or ([] if eos_id is None else [eos_id])
    if not (isinstance(eos_ids, list) and all(type(i) is int for i in eos_ids)):
        raise UserError(f"{where}: eos_ids must be a list of token ids")
    return RunSpec(kind, mcfg, run_dir, ckpt, tok_path, step, eos_id,
                   _token_id(saved, "bos_id", where), labels, max_len, tuple(eos_ids))


def _classifier_fields(saved: dict[str, Any], mcfg: ModelConfig, kind: Kind,
                       where: Path) -> tuple[tuple[str, ...], int | None]:
    """(labels, max_len) of a classifier run; ((), None) for the other kinds."""
    if kind != "classifier":
        return (), None
    assert isinstance(mcfg, EncoderConfig)
    labels = saved.get("labels")
    if not isinstance(labels, list) or len(labels) != mcfg.num_labels:
        raise UserError(f"{where}: labels must list the {mcfg.num_labels} label names")
    # An imported classifier has no max_len: it reads up to its context, as transformers does.
    max_len = min(int(saved.get("max_len") or mcfg.block_size), mcfg.block_size)
    return tuple(str(x) for x in labels), max_len


# --------------------------------------------------------------------------- loading


@dataclass
class Placement:
    """Where and in what precision an inference command runs the model. Every inference
    command's options inherit these fields, so ``--device``, ``--dtype`` and ``--quant`` mean
    one thing."""

    device: str = "auto"
    """auto (cuda when there is one, else cpu), cpu, cuda or cuda:N."""
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """Weights and KV cache precision: auto = bf16 on cuda, fp32 on cpu."""
    quant: Quant = "none"
    """Decoder weights in int8 or int4, quantized while loading. int8 on an x86 CPU in fp32: fbgemm's int8 GEMM with activations quantized per token (faster than fp32 there); elsewhere torchao int8 weight-only. int4: torchao weight-only. int8-dynamic: int8's CPU path by name (CPU + fp32 only). See lmforge.infer.quant. Needs pip install 'lmforge[quant]'."""


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_placement(device: str | torch.device = "auto",
                      dtype: str | torch.dtype = "auto") -> tuple[torch.device, torch.dtype]:
    """(device, dtype) for ``--device``/``--dtype``: auto = cuda + bf16 when CUDA is there, else
    cpu + fp32. ConfigError naming the option for a bad value or a GPU that is not there."""
    if isinstance(device, str):
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if not re.fullmatch(r"cpu|cuda(:\d+)?", device):
            raise ConfigError(f"device: expected auto, cpu, cuda or cuda:N, got {device!r}")
        device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device: {device} asked for, but torch sees no CUDA GPU; use --device "
                          "cpu (or auto)")
    if isinstance(dtype, str):
        if dtype == "auto":
            dtype = "bf16" if device.type == "cuda" else "fp32"
        if dtype not in DTYPES:
            raise ConfigError(f"dtype: expected auto, {', '.join(DTYPES)}, got {dtype!r}")
        dtype = DTYPES[dtype]
    return device, dtype



@dataclass
class LoadedRun:
    """A run's model (eval mode, on its device and dtype) with its tokenizer and spec."""

    spec: RunSpec
    model: nn.Module
    tokenizer: Tokenizer

    @property
    def kind(self) -> Kind:
        """decoder, encoder, classifier or seq2seq."""
        return self.spec.kind

    @property
    def run_dir(self) -> Path:
        """The run folder."""
        return self.spec.run_dir


@dataclass
class LoadedModel:
    """A decoder ready for inference, with its tokenizer and where it came from."""

    model: Decoder
    tokenizer: Any  # tokenizers.Tokenizer
    run_dir: Path
    checkpoint: Path
    step: int
    eos_id: int | None = None
    """Token that ends a text: config.yaml's eos_id (imported models), else <|endoftext|>."""
    bos_id: int | None = None
    """Token that starts a text, if the model wants one (config.yaml's bos_id: imports)."""
    eos_ids: list[int] = field(default_factory=list)
    """Every token that ends a text (Llama 3 has several): config.yaml's eos_ids, else [eos_id]."""


def build_model(spec: RunSpec, device: str | torch.device = "cpu",
                dtype: torch.dtype = torch.float32, quant: str = "none") -> nn.Module:
    """The spec's model with its checkpoint's weights, in ``dtype`` on ``device``, eval mode.

    Built on the meta device and cast there; each weight then comes from the checkpoint one
    tensor at a time and becomes the parameter itself (cast and moved as it arrives:
    ``checkpoint.stream_model_weights``), so a load holds the weights about once, not the
    whole file beside an allocated model (a sharded checkpoint is still read whole first).
    Derived buffers (rotary / sinusoid tables) are recomputed, in fp32, by the models'
    ``init_buffers``: they are angles, and bf16 would round them.
    ``quant`` (a decoder only) loads layer by layer, quantizing each as it arrives.
    """
    if not dtype.is_floating_point:
        raise UserError(f"dtype: {dtype} is not a floating-point type; use float32 or bfloat16")
    model_cls = _kinds()[spec.kind][2]
    if quant != "none" and spec.kind != "decoder":
        raise UserError(f"quant: quantizes decoder runs; {spec.run_dir} is {_article(spec.kind)} "
                        "run, so drop --quant")
    with torch.device("meta"):
        model = model_cls(spec.model_cfg)
    model.to(dtype)
    if quant != "none":
        assert isinstance(model, Decoder)
        with open_weights(spec.checkpoint) as read:
            return load_quantized(model, quant, torch.device(device), read, str(spec.checkpoint))
    stream_model_weights(spec.checkpoint, model, torch.device(device))
    init_buffers = getattr(model, "init_buffers", None)
    if init_buffers is not None:
        init_buffers()  # position tables, on the weights' device
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    assert not left, f"not materialized: {left}"
    return model.eval()


def load_run(path: str | Path, device: str | torch.device = "cpu",
             dtype: str | torch.dtype = torch.float32, quant: str = "none", *,
             rows: int | None = None) -> LoadedRun:
    """Open any run folder (or checkpoint folder) as a model of its kind, ready for inference.

    ``device``, ``dtype`` and ``quant`` take ``--device``/``--dtype``/``--quant`` values too
    ("auto", "bf16", "int8", ...). ``rows`` is how many token positions the caller feeds
    per decoding forward at most (generate and chat: 1; the engine: its max_batch; with a
    draft, the target's k + 1 per row; None: no token-by-token decoding).
    """
    device, dtype = resolve_placement(device, dtype)
    check_quant(quant, device, dtype)  # before reading anything
    spec = read_run_spec(path)
    model = build_model(spec, device, dtype, quant)
    if rows == 1 and isinstance(model, Decoder):
        # Column-major fp32 CPU weights (see decode_layout) pay for one row at a time only:
        # the engine's step was 1.08-1.30x faster at 1 row but 0.80-0.96x at 4 and 0.87-1.04x
        # at 16 (benchmarks/RESULTS.md, "Decode layout"), and the layout is fixed at load.
        decode_layout(model)
    encoder = spec.kind in ("encoder", "classifier")
    # An encoder's tokenizer.json (a BERT one especially) may pad and add [CLS]/[SEP] itself.
    tokenizer = encoder_tokenizer(spec.tokenizer) if encoder else load_tokenizer(spec.tokenizer)
    return LoadedRun(spec, model, tokenizer)


def load_model(path: str | Path, device: str | torch.device = "cpu",
               dtype: str | torch.dtype = torch.float32, quant: str = "none", *,
               rows: int | None = None) -> LoadedModel:
    """A decoder run as a ``LoadedModel``; UserError naming the kind for any other run.
    ``rows`` as in ``load_run``."""
    loaded = load_run(path, device, dtype, quant, rows=rows)
    spec = loaded.spec
    if not isinstance(loaded.model, Decoder):
        raise UserError(f"{spec.run_dir}: is {_article(spec.kind)} run; this needs a decoder run "
                        "(`lmforge pretrain`, `lmforge import` of a causal LM, a fine-tune)")
    return LoadedModel(loaded.model, loaded.tokenizer, spec.run_dir, spec.checkpoint, spec.step,
                       spec.eos_id, spec.bos_id, list(spec.eos_ids))


def _article(kind: Kind) -> str:
    return f"an {kind}" if kind[0] in "aeiou" else f"a {kind}"


# --------------------------------------------------------------------------- encoder bases


def is_hf_folder(path: Path) -> bool:
    """A Hugging Face model folder (config.json), not an lmforge run (config.yaml)."""
    return (path / CONFIG_FILE).is_file() and not (path / CONFIG_YAML).is_file()


def load_hf_classifier(folder: Path, num_labels: int) -> EncoderForClassification:
    """A Hugging Face BERT folder's body (BertModel, BertForMaskedLM or
    BertForSequenceClassification) under a fresh ``num_labels`` head and pooler, fp32."""
    if not (folder / TOKENIZER_FILE).is_file():
        raise UserError(f"{folder}: has no {TOKENIZER_FILE}; write one with transformers: "
                        "AutoTokenizer.from_pretrained(DIR).save_pretrained(DIR)")
    loaded, _ = load_hf_encoder(folder, torch.float32)
    body = loaded if isinstance(loaded, Encoder) else loaded.bert
    model = EncoderForClassification(replace(body.cfg, num_labels=num_labels))
    missing, unexpected = model.bert.load_state_dict(body.state_dict(), strict=False)
    # A masked-LM file has no pooler: it starts fresh, like the classifier.
    assert not unexpected and all(k.startswith("pooler.") for k in missing), (missing, unexpected)
    return model


def load_classifier_base(path: str | Path,
                         num_labels: int) -> tuple[EncoderForClassification, Path]:
    """An encoder's body under a fresh classification head; (model, folder of tokenizer.json).

    ``path`` is an encoder run (mlm or classifier, or one of its checkpoints) or a Hugging
    Face BERT folder (BertModel, BertForMaskedLM or BertForSequenceClassification).
    """
    path = Path(path)
    if is_hf_folder(path):
        return load_hf_classifier(path, num_labels), path
    spec = read_run_spec(path)
    if not isinstance(spec.model_cfg, EncoderConfig):
        raise UserError(f"{spec.run_dir}: is {_article(spec.kind)} run; --task classify needs "
                        "an encoder run (`lmforge pretrain --objective mlm`) or a Hugging Face "
                        "BERT folder")
    model = EncoderForClassification(replace(spec.model_cfg, num_labels=num_labels))
    body = {k: v for k, v in read_weights(spec.checkpoint).items() if k.startswith("bert.")}
    missing, unexpected = model.load_state_dict(body, strict=False)
    # The pooler and the classifier are new (an MLM run has neither); anything else must load.
    lost = [k for k in missing if not k.startswith(("bert.pooler.", "classifier."))]
    if lost or unexpected:
        raise UserError(f"{spec.checkpoint}: does not fit the encoder config (missing {lost[:3]},"
                        f" unexpected {list(unexpected)[:3]})")
    return model, spec.run_dir


# --------------------------------------------------------------------------- writing a run


def write_run_files(run_dir: Path, loaded: LoadedModel, template: ChatTemplate,
                    extra: dict[str, Any]) -> None:
    """A derived decoder run's files: config.yaml (model + eos_id + how it was made), the
    tokenizer, the chat template and the base's tokenizer side files."""
    saved = {"model": to_dict(loaded.model.cfg), "eos_id": loaded.eos_id,
             **({"eos_ids": loaded.eos_ids} if len(loaded.eos_ids) > 1 else {}), **extra}
    atomic_write_text(run_dir / CONFIG_YAML, yaml.safe_dump(saved, sort_keys=False))
    atomic_write_text(run_dir / TOKENIZER_FILE, loaded.tokenizer.to_str())
    atomic_write_text(run_dir / "chat_template.jinja", template.source)
    for name in SIDE_FILES:
        if (loaded.run_dir / name).is_file():
            atomic_write_bytes(run_dir / name, (loaded.run_dir / name).read_bytes())

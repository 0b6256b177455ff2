"""Export a run's model as a Hugging Face folder, a llama.cpp GGUF file or an ONNX graph.

The library behind `lmforge export` and `lmforge push` (thin recipes over ``export_run``; the
formats are described in the export recipe's help). Every export is written under a temporary
name, read back by a reader we did not write and compared in fp32 against lmforge's logits,
given a model card (README.md), and only then renamed into place.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import torch
from rich.console import Console

from lmforge.config import ConfigError, UserError, load_yaml
from lmforge.data.mlm import PAD_TOKEN
from lmforge.data.pairs import BOS_TOKEN
from lmforge.data.tokenizer import load_tokenizer
from lmforge.interop import gguf, llamacpp, marian, ollama, onnx
from lmforge.interop.card import CARD_FILE, CardInfo, model_card
from lmforge.interop.hf import (
    TOKENIZER_SIDE_FILES,
    bert_load_back_check,
    load_back_check,
    read_json,
    write_hf_encoder_folder,
    write_hf_folder,
)
from lmforge.models.decoder import Decoder
from lmforge.models.encoder import EncoderForClassification, EncoderForMaskedLM
from lmforge.models.seq2seq import Seq2Seq, Seq2SeqConfig
from lmforge.run import (
    LoadedModel,
    RunSpec,
    build_model,
    load_model,
    read_run_spec,
    resolve_placement,
)
from lmforge.utils.io import atomic_dir

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Default --tolerance: fp32 formats must agree to rounding; the others are lossy, and their
# limits are ~5-10x the largest max |Δlogits| measured on random tiny models, llama-1m trained
# on Shakespeare and SmolLM2-135M (README, "lmforge export"; tests/parity/test_gguf.py).
TOLERANCES = {"hf": 1e-4, "onnx": 1e-4, "gguf.f32": 1e-4, "gguf.f16": 0.25, "gguf.bf16": 1.5,
              "gguf.q8_0": 4.0, "gguf.q4_0": 30.0, "gguf.q6_k": 8.0, "gguf.q5_k_m": 30.0,
              "gguf.q4_k_m": 40.0}
# Text whose token ids must survive the GGUF round trip (digits, spaces, newlines, accents).
TOKENIZER_PROBE = ("Hello world! It's 2024: the café's 3 cats cost 12.50 each.\n\n"
                   "    indented line\tand a tab; ünïcödé, 東京, emoji 🙂.")


# A suffix that says the user meant a file, where --out is a folder (the export is several files);
# only a GGUF export is one file, so `--format gguf --out NAME.gguf` writes just that file.
FILE_SUFFIXES = (".gguf", ".onnx", ".safetensors", ".bin")
GGUF_SUFFIX = ".gguf"


@dataclass
class ExportConfig:
    """Options of `lmforge export`."""

    run: str = "runs/shakespeare"
    """A run folder (uses its latest checkpoint) or one checkpoint folder."""
    format: Literal["hf", "gguf", "onnx"] = "hf"
    """Output format: hf = a Hugging Face transformers folder, gguf = a llama.cpp file, onnx = an ONNX graph for onnxruntime."""
    out: str = ""
    """Folder to create, e.g. exports/NAME (the files and a README.md model card go inside); for gguf also a file NAME.gguf (that file alone)."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """hf only: precision of the written weights; auto = the checkpoint's (a bf16 import stays bf16) (gguf: --gguf_type; onnx is fp32)."""
    gguf_type: Literal["f32", "f16", "bf16", "q8_0", "q4_0", "q4_k_m", "q5_k_m", "q6_k"] = "f16"
    """gguf only: type of the weight matrices (norms stay f32; q4_0 keeps the embedding and head at q8_0; the K-quants q4_k_m, q5_k_m, q6_k are made by llama.cpp's quantizer: pip install llama-cpp-python)."""
    kv_cache: bool = False
    """onnx only: add past_key_values.N.key/value inputs and present.N.key/value outputs."""
    tolerance: float | None = None
    """Largest max |Δlogits| (fp32) the load-back check accepts; null = the format's default (1e-4 for hf, onnx, gguf f32; gguf f16 0.25, bf16 1.5, q8_0 4, q4_0 30, q6_k 8, q5_k_m 30, q4_k_m 40)."""
    overwrite: bool = False
    """Replace --out if it exists."""
    device: str = "auto"
    """Where the run is opened: auto (cuda when there is one, else cpu), cpu, cuda or cuda:N. The export is written and checked from the CPU in fp32, so its files are the same on any device."""

    def __post_init__(self) -> None:
        if not self.out:
            raise ConfigError("out: missing; say where the export goes, e.g. --out exports/NAME")
        if self.single_file and self.format != "gguf":
            raise ConfigError(f"out: {self.out} names a .gguf file, but --format is "
                              f"{self.format}; add --format gguf, or give a folder")
        if Path(self.out).suffix.lower() in FILE_SUFFIXES and not self.single_file:
            raise ConfigError(f"out: {self.out} names a file, but --out is the folder the export "
                              "is written into (with its model card); use e.g. "
                              f"--out {Path(self.out).with_suffix('')}")
        if self.tolerance is not None and not self.tolerance > 0:
            raise ConfigError(f"tolerance: must be > 0, got {self.tolerance}")
        resolve_placement(self.device)  # a bad --device or a missing GPU: before any work
        if self.format != "hf" and self.dtype != "auto":
            hint = "--gguf_type" if self.format == "gguf" else "nothing: onnx is fp32"
            raise ConfigError(f"dtype: applies to --format hf only; for {self.format} use {hint}")

    @property
    def single_file(self) -> bool:
        """--out names one .gguf file rather than a folder."""
        return Path(self.out).suffix.lower() == GGUF_SUFFIX

    @property
    def limit(self) -> float:
        """The load-back tolerance in force."""
        if self.tolerance is not None:
            return self.tolerance
        return TOLERANCES[f"gguf.{self.gguf_type}" if self.format == "gguf" else self.format]


@dataclass
class Exported:
    """What an exporter reports back: its check and the facts the model card states."""

    diff: float
    reader: str  # who read the export back, e.g. "transformers"
    detail: str  # what it ran, e.g. "LlamaForCausalLM"
    precision: str
    extra: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # printed after the check line


def _copy_tokenizer(run_dir: Path, out: Path) -> None:
    shutil.copyfile(run_dir / "tokenizer.json", out / "tokenizer.json")
    for name in TOKENIZER_SIDE_FILES:
        if (run_dir / name).is_file():
            shutil.copyfile(run_dir / name, out / name)


def checkpoint_dtype(ckpt: Path) -> torch.dtype:
    """The dtype a checkpoint stores its weights in (its first floating tensor); fp32 when it
    is sharded or holds none."""
    from safetensors import safe_open

    from lmforge.checkpoint import MODEL_FILE

    if not (ckpt / MODEL_FILE).is_file():
        return torch.float32
    with safe_open(str(ckpt / MODEL_FILE), framework="pt") as f:
        names = f.keys()
        for key in names:
            dtype = f.get_slice(key).get_dtype()
            if dtype in ("BF16", "F16", "F32"):
                return {"BF16": torch.bfloat16, "F16": torch.float16}.get(dtype, torch.float32)
    return torch.float32


def export_hf(loaded: LoadedModel, out: Path, cfg: ExportConfig) -> Exported:
    """Write a Hugging Face folder into ``out`` and check it against transformers."""
    dtype = checkpoint_dtype(loaded.checkpoint) if cfg.dtype == "auto" else DTYPES[cfg.dtype]
    source = load_yaml(loaded.run_dir / "config.yaml").get("architecture")
    pad = _kept_metadata(loaded.run_dir).get("tokenizer.ggml.padding_token_id")
    arch = write_hf_folder(loaded.model, loaded.run_dir, out, bos_id=loaded.bos_id,
                           eos_id=loaded.eos_id, dtype=dtype, eos_ids=loaded.eos_ids,
                           prefer=source if isinstance(source, str) else None,
                           pad_id=pad if isinstance(pad, int) else None)
    diff = load_back_check(loaded.model, out, dtype)
    return Exported(diff, "transformers", arch, str(dtype).removeprefix("torch."),
                    {"architecture": arch})


def _chat_template(run_dir: Path) -> str | None:
    """The run's chat template: chat_template.jinja, else tokenizer_config.json's entry (the
    places `lmforge import` keeps it and `lmforge chat` reads it)."""
    if (run_dir / "chat_template.jinja").is_file():
        return (run_dir / "chat_template.jinja").read_text(encoding="utf-8")
    side = run_dir / "tokenizer_config.json"
    value = read_json(side).get("chat_template") if side.is_file() else None
    return value if isinstance(value, str) else None


def export_gguf(loaded: LoadedModel, out: Path, cfg: ExportConfig) -> Exported:
    """Write one .gguf file into ``out``; read it back with gguf's reader and our importer."""
    model, run_dir = loaded.model.float(), loaded.run_dir
    name = run_dir.resolve().name
    k_quant = cfg.gguf_type in llamacpp.K_QUANTS
    ggml_type = cfg.gguf_type.upper() if k_quant else gguf.TYPES[cfg.gguf_type][0]
    path = out / (Path(cfg.out).name if cfg.single_file else f"{name}.{ggml_type}.gguf")
    meta = gguf.GGUFMeta(name, run_dir / "tokenizer.json", loaded.bos_id, loaded.eos_id,
                         _chat_template(run_dir), _kept_metadata(run_dir))
    if k_quant:  # llama.cpp quantizes an F32 file, as `llama-quantize` would
        llamacpp.llama_cpp()  # the missing-package error before minutes of work
        source = out / f".{name}.F32.gguf"
        gguf.write_gguf(model, source, "f32", meta)
        llamacpp.quantize(source, path, cfg.gguf_type)
        source.unlink()
    else:
        gguf.write_gguf(model, path, cfg.gguf_type, meta)
    check = gguf.load_back_check(model, path)
    counts = check.file.types
    probe = TOKENIZER_PROBE + "".join(_special_tokens(loaded))
    mismatch = gguf.tokenizer_round_trip(check.file, run_dir / "tokenizer.json", probe)
    if mismatch:
        raise UserError(f"{cfg.out}: the tokenizer does not survive the GGUF round trip "
                        f"({mismatch}); nothing was written (please report this)")
    types = ", ".join(f"{n} {t}" for t, n in counts.most_common())
    notes = [] if cfg.single_file else [_write_modelfile(loaded, path, out)]
    return Exported(
        check.max_diff, "the gguf reader", "tensors dequantized by lmforge's GGUF import",
        f"{ggml_type} ({types} tensors)",
        {"chat template": "yes" if meta.chat_template else "none",
         "same top-1 token as the fp32 model": f"{check.top1:.1%} of the check positions"},
        [f"wrote {path.name}: {path.stat().st_size / 1e6:.1f} MB; the same top-1 token as the "
         f"fp32 model at {check.top1:.1%} of positions; tokenizer ids identical", *notes])


def _write_modelfile(loaded: LoadedModel, path: Path, out: Path) -> str:
    """An Ollama Modelfile beside the .gguf: FROM it, the chat template as TEMPLATE, the EOS
    tokens and end-of-turn as stops, num_ctx the model's context (beyond it a model trained
    here has seen no positions; sampling stays at Ollama's defaults); what it did."""
    tok: Any = loaded.tokenizer
    eos = [tok.id_to_token(i) for i in dict.fromkeys(
        [*([] if loaded.eos_id is None else [loaded.eos_id]), *loaded.eos_ids])]
    template = None
    if _chat_template(loaded.run_dir) is not None:
        from lmforge.infer.chat import load_chat_template

        template = load_chat_template(loaded.run_dir, eos_token=eos[0] if eos else "")
    text, skipped = ollama.modelfile(path.name, template, [e for e in eos if e],
                                     {"num_ctx": loaded.model.cfg.block_size})
    (out / ollama.MODELFILE).write_text(text, encoding="utf-8")
    if template is None:
        return f"wrote {ollama.MODELFILE} (no chat template in the run: raw prompts)"
    if skipped:
        return f"wrote {ollama.MODELFILE} without TEMPLATE: {skipped}"
    return (f"wrote {ollama.MODELFILE} (TEMPLATE from the run's chat template); in the export "
            f"folder: ollama create NAME -f {ollama.MODELFILE}")


def _kept_metadata(run_dir: Path) -> dict[str, Any]:
    """The source metadata an import kept in config.yaml (gguf_metadata: GGUF keys, also
    written by a Hugging Face import for its name and pad id), for a re-export."""
    kept = load_yaml(run_dir / "config.yaml").get("gguf_metadata") or {}
    return dict(kept) if isinstance(kept, dict) else {}


def _special_tokens(loaded: LoadedModel) -> list[str]:
    tok: Any = loaded.tokenizer
    return [t.content for t in tok.get_added_tokens_decoder().values()]


def export_onnx(loaded: LoadedModel, out: Path, cfg: ExportConfig) -> Exported:
    """Write model.onnx (+ tokenizer) into ``out``; run it in onnxruntime on two shapes."""
    model: Decoder = loaded.model.float()
    seconds = onnx.export_onnx(model, out / "model.onnx", cfg.kv_cache)
    diff, runs = onnx.load_back_check(model, out / "model.onnx", cfg.kv_cache)
    _copy_tokenizer(loaded.run_dir, out)
    inputs, outputs = onnx.io_names(model.cfg.n_layer, cfg.kv_cache)
    axes = "batch, sequence" + (", past_sequence" if cfg.kv_cache else "")
    return Exported(diff, "onnxruntime", f"batch x sequence {', '.join(runs)}", "float32",
                    {"inputs": _names(inputs), "outputs": _names(outputs), "dynamic axes": axes},
                    [f"exported with torch.onnx (dynamo) in {seconds:.1f} s"])


def _names(names: list[str]) -> str:
    """'a' or 'a, b, ... (n in all)': the graph's inputs or outputs, for the card."""
    return names[0] if len(names) == 1 else f"{names[0]}, {names[1]}, ... ({len(names)} in all)"


def _exporters() -> dict[str, Callable[[LoadedModel, Path, ExportConfig], Exported]]:
    # One function per --format; a new format is one more entry (and one more Literal value).
    return {"hf": export_hf, "gguf": export_gguf, "onnx": export_onnx}


def write_export(loaded: LoadedModel, out: Path, cfg: ExportConfig, console: Console,
                 repo: str | None = None) -> None:
    """Export into the (temporary) folder ``out``, check it, then write the model card."""
    params = loaded.model.num_params()  # before an exporter changes the model's dtype
    t0 = time.perf_counter()
    done = _exporters()[cfg.format](loaded, out, cfg)
    _report_check(cfg, console, done, t0)
    files = sorted([*(p.name for p in out.iterdir()), CARD_FILE])
    check = (f"max |Δlogits| = {done.diff:.2e} against lmforge in fp32, read back by "
             f"{done.reader} ({done.detail})")
    info = CardInfo(loaded.run_dir, loaded.checkpoint, loaded.model.cfg, params, cfg.format,
                    done.precision, check, files, repo, loaded.eos_id, done.extra)
    (out / CARD_FILE).write_text(model_card(info), encoding="utf-8")


# --------------------------------------------------------------------------- encoder runs


def export_encoder(spec: RunSpec, cfg: ExportConfig, console: Console,
                   repo: str | None = None) -> None:
    """A BERT run -> a BertForMaskedLM / BertForSequenceClassification folder, checked against
    transformers on padded two-segment inputs, with its model card."""
    if cfg.format != "hf":
        raise UserError(f"{cfg.run}: an encoder run exports only as --format hf, "
                        f"not {cfg.format}")
    model = _on_cpu(build_model(spec, _device(cfg)))
    assert isinstance(model, EncoderForMaskedLM | EncoderForClassification)
    labels = list(spec.labels) or None
    pad_id = load_tokenizer(spec.tokenizer).token_to_id(PAD_TOKEN)
    dtype = checkpoint_dtype(spec.checkpoint) if cfg.dtype == "auto" else DTYPES[cfg.dtype]
    params = model.num_params()
    t0 = time.perf_counter()
    with _writing(cfg) as tmp:
        arch = write_hf_encoder_folder(model, spec.run_dir, tmp, pad_id=pad_id, labels=labels,
                                       dtype=dtype)
        diff = bert_load_back_check(model, tmp, dtype)
        _check_and_card(spec, cfg, console, tmp, Exported(
            diff, "transformers", f"{arch}; padded, two segments", _name(dtype),
            {"architecture": arch}), params, t0, repo)


def _seq2seq_ids(spec: RunSpec) -> marian.Seq2SeqIds:
    """(pad, decoder start, eos) of an encoder-decoder run: config.yaml's pad_id/bos_id/eos_id
    (imports), else the [PAD], [BOS] and <|endoftext|> that pretraining adds."""
    tok = load_tokenizer(spec.tokenizer)
    saved = load_yaml(spec.config_file)
    pad = saved.get("pad_id", tok.token_to_id(PAD_TOKEN))
    start = spec.bos_id if spec.bos_id is not None else tok.token_to_id(BOS_TOKEN)
    if not all(isinstance(i, int) for i in (pad, start, spec.eos_id)):
        raise UserError(f"{spec.config_file}: the run names no pad/bos/eos token ids and its "
                        f"tokenizer lacks {PAD_TOKEN}, {BOS_TOKEN} or <|endoftext|>; add "
                        "pad_id, bos_id and eos_id to config.yaml")
    return marian.Seq2SeqIds(pad, start, spec.eos_id)  # type: ignore[arg-type]


def export_seq2seq(spec: RunSpec, cfg: ExportConfig, console: Console,
                   repo: str | None = None) -> None:
    """An encoder-decoder run -> a MarianMTModel (post-norm) or PegasusForConditionalGeneration
    (pre-norm) folder, checked against transformers on a padded batch, with its model card."""
    if cfg.format != "hf":
        raise UserError(f"{cfg.run}: an encoder-decoder run exports only as --format hf, "
                        f"not {cfg.format}")
    assert isinstance(spec.model_cfg, Seq2SeqConfig)
    marian.export_architecture(spec.model_cfg)  # a refusal before any work
    ids = _seq2seq_ids(spec)
    model = _on_cpu(build_model(spec, _device(cfg)))
    assert isinstance(model, Seq2Seq)
    dtype = checkpoint_dtype(spec.checkpoint) if cfg.dtype == "auto" else DTYPES[cfg.dtype]
    params = model.num_params()
    t0 = time.perf_counter()
    with _writing(cfg) as tmp:
        arch = marian.write_folder(model, spec.tokenizer, tmp, ids, dtype)
        diff = marian.load_back_check(model, tmp, dtype)
        _check_and_card(spec, cfg, console, tmp, Exported(
            diff, "transformers", f"{arch}; teacher-forced, padded source", _name(dtype),
            {"architecture": arch, "decoder start / end / padding token ids":
             f"{ids.start} / {ids.eos} / {ids.pad}"}), params, t0, repo)


def _device(cfg: ExportConfig) -> torch.device:
    return resolve_placement(cfg.device, torch.float32)[0]


M = TypeVar("M", bound=torch.nn.Module)


def _on_cpu(model: M) -> M:
    """The model opened on --device, moved to the CPU (fp32 weights move exactly): the writers
    store CPU tensors and the readers that check the export (transformers, gguf, onnxruntime)
    run there, so the files and the check are the same whichever device opened the run."""
    return model.to("cpu")


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _report_check(cfg: ExportConfig, console: Console, done: Exported, t0: float) -> None:
    """Print the load-back check and the exporter's notes; refuse beyond --tolerance."""
    console.print(f"load-back check ({done.reader}: {done.detail}; fp32): max |Δlogits| = "
                  f"{done.diff:.2e} (tolerance {cfg.limit:g}; export and check took "
                  f"{time.perf_counter() - t0:.1f} s)", markup=False, soft_wrap=True)
    for note in done.notes:
        console.print(note, markup=False, soft_wrap=True)
    if not done.diff <= cfg.limit:  # also catches NaN
        raise UserError(f"{cfg.out}: {done.reader}'s logits differ from lmforge's "
                        f"by {done.diff:.2e} (> --tolerance {cfg.limit:g}); nothing was written")


def _check_and_card(spec: RunSpec, cfg: ExportConfig, console: Console, out: Path,
                    done: Exported, params: int, t0: float, repo: str | None) -> None:
    """An encoder's or encoder-decoder's check (as ``_report_check``), then its model card."""
    _report_check(cfg, console, done, t0)
    check = (f"max |Δlogits| = {done.diff:.2e} against lmforge in fp32, read back by "
             f"{done.reader} ({done.detail})")
    files = sorted([*(p.name for p in out.iterdir()), CARD_FILE])
    info = CardInfo(spec.run_dir, spec.checkpoint, spec.model_cfg, params, cfg.format,
                    done.precision, check, files, repo, spec.eos_id, done.extra,
                    kind=spec.kind, labels=list(spec.labels))
    (out / CARD_FILE).write_text(model_card(info), encoding="utf-8")


@contextmanager
def _writing(cfg: ExportConfig) -> Iterator[Path]:
    """A temporary folder renamed to --out on success (for --out NAME.gguf: the file in it
    renamed to NAME.gguf, the rest dropped); a failed write (read-only or full disk) is one
    UserError naming --out, with nothing left behind."""
    out = Path(cfg.out)
    if out.exists() and not cfg.overwrite:
        raise UserError(f"{out}: already exists; pass --overwrite to replace it, or another --out")
    try:
        if cfg.single_file:
            out.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(prefix=f".{out.name}.", dir=out.parent) as tmp:
                yield Path(tmp)
                os.replace(Path(tmp) / out.name, out)
            return
        with atomic_dir(out, overwrite=cfg.overwrite) as tmp:
            yield tmp
    except OSError as e:
        raise UserError(f"{out}: cannot write the export there ({e.strerror or e}); "
                        "choose a writable --out") from None


def export_decoder(spec: RunSpec, cfg: ExportConfig, console: Console,
                   repo: str | None = None) -> LoadedModel:
    """Load the decoder, write the export under a temporary name, check it, rename it into place.

    ``repo`` (a Hub name, from `lmforge push`) goes into the model card's loading snippets.
    """
    loaded = load_model(spec.checkpoint, cfg.device, torch.float32)
    loaded.model = _on_cpu(loaded.model)
    # LoRA hook: a run holding an adapter already holds the merged weights too (finetune
    # saves both), so every format below stores plain dense weights.
    with _writing(cfg) as tmp:
        write_export(loaded, tmp, cfg, console, repo)
    return loaded


def export_run(cfg: ExportConfig, console: Console, repo: str | None = None) -> Path:
    """Export the run (any kind that has an exporter) as ``cfg.format`` into ``cfg.out``;
    the checkpoint that was exported."""
    spec = read_run_spec(cfg.run)
    if spec.kind in ("encoder", "classifier"):
        export_encoder(spec, cfg, console, repo)
    elif spec.kind == "seq2seq":
        export_seq2seq(spec, cfg, console, repo)
    else:
        export_decoder(spec, cfg, console, repo)
    return spec.checkpoint

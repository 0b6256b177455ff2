"""Import a Hugging Face causal LM (Llama, Qwen2, Qwen3, Mistral, Phi-3, Gemma 2/3, GPT-2), a
BERT (BertForMaskedLM, BertForSequenceClassification), an encoder-decoder (MarianMTModel,
PegasusForConditionalGeneration) or a GGUF file as a run folder.

SRC is a local model folder (config.json, safetensors weights, tokenizer files), a Hub name
(when online), or a llama.cpp .gguf file (llama, qwen2, qwen3 or gpt2 architecture; F32, F16, BF16,
Q8_0, Q4_0, Q4_1 and the other types the gguf package dequantizes). The run folder gets config.yaml (the model
as a DecoderConfig, the source and its BOS/EOS ids), tokenizer.json (+ the chat template) and a
step-0 checkpoint, so `lmforge generate --run` and `lmforge export` work on it. Only safetensors
and GGUF weights are read: a pickle is never loaded.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from rich.console import Console

from lmforge.checkpoint import TrainState, save_checkpoint
from lmforge.config import ConfigError, UserError, to_dict
from lmforge.data.tokenizer import load_tokenizer, vocab_size_of
from lmforge.interop import gguf, marian
from lmforge.interop.hf import (
    CONFIG_FILE,
    TOKENIZER_FILE,
    bert_architecture,
    copy_tokenizer,
    load_hf_encoder,
    load_hf_model,
    read_json,
    resolve_source,
    special_token_ids,
)
from lmforge.models.encoder import EncoderForClassification, EncoderForMaskedLM
from lmforge.utils.io import atomic_dir

POSITIONAL = ("src",)

EXAMPLES = """
lmforge import ./SmolLM2-135M --out runs/smollm2          # a local Hugging Face folder
lmforge import HuggingFaceTB/SmolLM2-135M --out runs/smollm2   # a Hub name, when online
lmforge import SmolLM2-135M-Instruct.Q4_1.gguf --out runs/smol   # a llama.cpp GGUF file
lmforge generate --run runs/smollm2 --prompt "The capital of France is" --greedy
"""

CHAT_TEMPLATE_FILE = "chat_template.jinja"  # where transformers v5 (and HF imports) keep it
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Config:
    """Options of `lmforge import`."""

    src: str = ""
    """Hugging Face model folder (config.json, *.safetensors, tokenizer.json), a Hub name (online) or a .gguf file."""
    out: str = ""
    """Run folder to create, e.g. runs/llama."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Precision of the saved weights; auto keeps the file's (float32 for GGUF: dequantized
    blocks are exact in fp32 only); generate computes in fp32 either way."""
    overwrite: bool = False
    """Replace --out if it exists."""

    def __post_init__(self) -> None:
        if not self.src:
            raise ConfigError("src: missing; name the model: lmforge import SRC --out runs/NAME")
        if not self.out:
            raise ConfigError("out: missing; say where the run goes, e.g. --out runs/NAME")


def main(cfg: Config) -> int:
    """Read the folder, convert config, weights and tokenizer, write the run atomically."""
    out = Path(cfg.out)
    if out.exists() and not cfg.overwrite:
        raise UserError(f"{out}: already exists; pass --overwrite to replace it, or another --out")
    src = Path(cfg.src).expanduser()
    if gguf.is_gguf(src):  # by its magic bytes, whatever the file is called
        return import_gguf(cfg, src, out)
    if src.suffix == ".gguf" and not src.exists():  # else it would be tried as a Hub name
        raise UserError(f"{cfg.src}: no such file")
    folder = resolve_source(cfg.src)
    hf = read_json(folder / CONFIG_FILE)
    if bert_architecture(hf) is not None:
        return import_bert(cfg, folder, out)
    if hf.get("is_encoder_decoder") or marian.seq2seq_architecture(hf) is not None:
        return import_seq2seq(cfg, folder, out)
    model, arch = load_hf_model(folder, DTYPES.get(cfg.dtype))
    with atomic_dir(out, overwrite=cfg.overwrite) as tmp:
        tok = _copy_checked_tokenizer(folder, tmp, model.cfg.vocab_size)
        bos_ids, eos_ids = (special_token_ids(folder, hf, name, tok) for name in ("bos", "eos"))
        bos_id, eos_id = (ids[0] if ids else None for ids in (bos_ids, eos_ids))
        # eos_id stays the first for older readers; eos_ids holds every id that ends a text.
        record = {"source": cfg.src, "architecture": arch, "bos_id": bos_id, "eos_id": eos_id,
                  "eos_ids": eos_ids, "gguf_metadata": _kept_metadata(cfg.src, hf),
                  "model": to_dict(model.cfg)}
        _write_run(tmp, record, model, cfg.src, arch, folder)
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    Console(highlight=False).print(
        f"imported {arch} from {cfg.src}: {model.num_params():,} parameters ({dtype}), "
        f"{model.cfg.n_layer} layers, width {model.cfg.n_embd}, context {model.cfg.block_size}, "
        f"eos id{'s' if len(eos_ids) > 1 else ''} {', '.join(map(str, eos_ids)) or None}"
        f"\n-> {out}    try: lmforge generate --run {out} --greedy",
        markup=False, soft_wrap=True,
    )
    return 0


def _kept_metadata(src: str, hf: dict[str, Any]) -> dict[str, Any]:
    """What an export writes back, as GGUF keys (as a GGUF import keeps them): the model's
    name (the folder's or Hub name's last part) and its pad id."""
    kept: dict[str, Any] = {"general.name": Path(src.rstrip("/")).name}
    pad = hf.get("pad_token_id")
    if isinstance(pad, int) and not isinstance(pad, bool):
        kept["tokenizer.ggml.padding_token_id"] = pad
    return kept


def _copy_checked_tokenizer(folder: Path, tmp: Path, vocab_size: int) -> Any:
    """Copy the folder's tokenizer into the run; refuse one with ids beyond the model's vocab."""
    copy_tokenizer(folder, tmp)
    tok = load_tokenizer(tmp / TOKENIZER_FILE)
    if vocab_size_of(tok) > vocab_size:
        raise UserError(f"{folder}: the tokenizer has ids up to {vocab_size_of(tok) - 1} "
                        f"but vocab_size is {vocab_size}; wrong tokenizer files?")
    return tok


def _write_run(tmp: Path, record: dict[str, Any], model: Any, src: str, arch: str,
               folder: Path) -> None:
    """config.yaml and a step-0 checkpoint: what makes a folder an lmforge run."""
    (tmp / "config.yaml").write_text(yaml.safe_dump(record, sort_keys=False), encoding="utf-8")
    save_checkpoint(tmp, TrainState(), model, None,
                    info={"source": src, "architecture": arch, "folder": str(folder)})


def import_bert(cfg: Config, folder: Path, out: Path) -> int:
    """A BertForMaskedLM / BertForSequenceClassification folder -> an encoder run folder.

    config.yaml is what the run would hold had lmforge trained it: a masked LM as
    `pretrain --objective mlm` writes it (objective + encoder), a classifier as
    `finetune --task classify` does (encoder + task + labels).
    """
    hf = read_json(folder / CONFIG_FILE)
    if bert_architecture(hf) == "BertModel":
        raise UserError(f"{folder / CONFIG_FILE}: BertModel has no head, so a run could not "
                        "use it; lmforge import takes BertForMaskedLM or "
                        "BertForSequenceClassification")
    model, arch = load_hf_encoder(folder, DTYPES.get(cfg.dtype))
    assert isinstance(model, EncoderForMaskedLM | EncoderForClassification)
    record: dict[str, Any] = {"source": cfg.src, "architecture": arch}
    if isinstance(model, EncoderForMaskedLM):
        record.update(objective="mlm", encoder=to_dict(model.cfg))
    else:
        id2label = hf.get("id2label") or {}
        labels = [str(id2label.get(str(i), id2label.get(i, f"LABEL_{i}")))
                  for i in range(model.cfg.num_labels)]
        record.update(encoder=to_dict(model.cfg), task="classify", labels=labels)
    with atomic_dir(out, overwrite=cfg.overwrite) as tmp:
        _copy_checked_tokenizer(folder, tmp, model.cfg.vocab_size)
        _write_run(tmp, record, model, cfg.src, arch, folder)
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    Console(highlight=False).print(
        f"imported {arch} from {cfg.src}: {model.num_params():,} parameters ({dtype}), "
        f"{model.cfg.n_layer} layers, width {model.cfg.n_embd}, context {model.cfg.block_size}"
        f"\n-> {out}    try: lmforge export --run {out} --format hf --out exports/NAME",
        markup=False, soft_wrap=True,
    )
    return 0


def import_seq2seq(cfg: Config, folder: Path, out: Path) -> int:
    """A MarianMTModel / PegasusForConditionalGeneration folder -> an encoder-decoder run,
    written as `pretrain --objective seq2seq` writes one, plus the folder's special ids
    (decoder start as bos_id, eos_id, pad_id), which its tokenizer names differently."""
    where = folder / CONFIG_FILE
    hf = read_json(where)
    model, arch = marian.load_hf_seq2seq(folder, DTYPES.get(cfg.dtype))
    ids = marian.special_ids(hf, str(where))
    record = {"source": cfg.src, "architecture": arch, "objective": "seq2seq",
              "bos_id": ids.start, "eos_id": ids.eos, "pad_id": ids.pad,
              "seq2seq": to_dict(model.cfg)}
    with atomic_dir(out, overwrite=cfg.overwrite) as tmp:
        _copy_checked_tokenizer(folder, tmp, model.cfg.vocab_size)
        _write_run(tmp, record, model, cfg.src, arch, folder)
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    Console(highlight=False).print(
        f"imported {arch} from {cfg.src}: {model.num_params():,} parameters ({dtype}), "
        f"{model.cfg.n_encoder_layer}+{model.cfg.n_decoder_layer} layers ({model.cfg.norm}-norm),"
        f" width {model.cfg.n_embd}, decoder start / eos / pad ids {ids.start} / {ids.eos} / "
        f"{ids.pad}\n-> {out}    try: lmforge export --run {out} --format hf --out exports/NAME",
        markup=False, soft_wrap=True,
    )
    return 0


def import_gguf(cfg: Config, path: Path, out: Path) -> int:
    """A llama.cpp GGUF file -> run folder: dequantized weights, rebuilt tokenizer, template."""
    t0 = time.perf_counter()
    f = gguf.GGUFFile.open(path)
    model = gguf.load_gguf_model(f, DTYPES.get(cfg.dtype, torch.float32))
    tok = gguf.gguf_tokenizer(f)
    if vocab_size_of(tok) > model.cfg.vocab_size:
        raise UserError(f"{path}: the tokenizer has ids up to {vocab_size_of(tok) - 1} but "
                        f"token_embd.weight has {model.cfg.vocab_size} rows")
    bos_id, eos_id = gguf.special_ids(f)
    template = gguf.chat_template(f)
    with atomic_dir(out, overwrite=cfg.overwrite) as tmp:
        tok.save(str(tmp / TOKENIZER_FILE))
        _write_tokenizer_side_files(tmp, tok, bos_id, eos_id, template, model.cfg.block_size)
        # gguf_metadata: the file's name, license, languages, pad/unk ids..., which a GGUF
        # re-export writes back.
        record = {"source": cfg.src, "format": "gguf", "architecture": f.arch,
                  "gguf_types": dict(sorted(f.types.items())), "bos_id": bos_id,
                  "eos_id": eos_id, "eos_ids": gguf.stop_ids(f),
                  "gguf_metadata": f.kept_metadata(),
                  "model": to_dict(model.cfg)}
        (tmp / "config.yaml").write_text(yaml.safe_dump(record, sort_keys=False), encoding="utf-8")
        save_checkpoint(tmp, TrainState(), model, None,
                        info={"source": cfg.src, "format": "gguf", "file": str(path)})
    types = ", ".join(f"{n} {k}" for k, n in f.types.most_common())
    Console(highlight=False).print(
        f"imported GGUF {f.meta.get('general.name', path.name)!r} ({types} tensors) in "
        f"{time.perf_counter() - t0:.1f} s: {model.num_params():,} parameters, "
        f"{model.cfg.n_layer} layers, width {model.cfg.n_embd}, context {model.cfg.block_size}, "
        f"eos id {eos_id}{', chat template' if template else ''}\n-> {out}    try: lmforge "
        f"{'chat' if template else 'generate'} --run {out}", markup=False, soft_wrap=True)
    return 0


def _write_tokenizer_side_files(out: Path, tok: Any, bos_id: int | None, eos_id: int | None,
                                template: str | None, max_length: int) -> None:
    """tokenizer_config.json and chat_template.jinja, as a transformers v5 folder has them.

    The same files an import of a Hugging Face folder copies, so `lmforge export --format hf`
    (and a chat command) find the special tokens and the template in the same place.
    """
    config: dict[str, object] = {"tokenizer_class": "PreTrainedTokenizerFast",
                                 "model_max_length": max_length,
                                 "clean_up_tokenization_spaces": False}
    for name, i in (("bos_token", bos_id), ("eos_token", eos_id)):
        if i is not None:
            config[name] = tok.id_to_token(i)
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n",
                                               encoding="utf-8")
    if template:
        (out / CHAT_TEMPLATE_FILE).write_text(template, encoding="utf-8")

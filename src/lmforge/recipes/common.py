"""Pieces several recipes share: the run folder layout and loading a trained model back."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.console import Console

from lmforge.checkpoint import latest_checkpoint, load_model_weights, read_meta
from lmforge.config import ConfigError, UserError, from_dict, load_yaml
from lmforge.data.tokenizer import EOS_TOKEN, load_tokenizer
from lmforge.infer.generate import generate
from lmforge.models.decoder import Decoder, DecoderConfig


@dataclass
class LoadedModel:
    """A model ready for inference, with its tokenizer and where it came from."""

    model: Decoder
    tokenizer: object  # tokenizers.Tokenizer
    run_dir: Path
    checkpoint: Path
    step: int
    eos_id: int | None = None
    """Token that ends a text: config.yaml's eos_id (imported models), else <|endoftext|>."""
    eos_ids: list[int] = field(default_factory=list)
    """Every token that ends a text (Llama 3 has several): config.yaml's eos_ids, else [eos_id]."""


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
    if not (run_dir / "config.yaml").is_file():
        raise UserError(f"{run_dir}: config.yaml is missing, so the model cannot be rebuilt")
    return run_dir, ckpt


def load_model(path: str | Path, device: str = "cpu") -> LoadedModel:
    """Rebuild a run's model from its config.yaml and load the latest (or given) checkpoint."""
    run_dir, ckpt = find_run_dir(Path(path))
    saved = load_yaml(run_dir / "config.yaml")
    try:
        mcfg = from_dict(DecoderConfig, saved.get("model", {}), "model")
    except ConfigError as e:
        raise UserError(f"{run_dir / 'config.yaml'}: {e}") from None
    with torch.device("meta"):
        model = Decoder(mcfg)
    model.to_empty(device=device)
    model.init_buffers()  # rotary/sinusoid tables only: every weight is loaded next
    load_model_weights(ckpt, model)
    model.eval()
    tokenizer = load_tokenizer(run_dir / "tokenizer.json")
    step = int(read_meta(ckpt).get("step", 0))
    eos_id = saved["eos_id"] if "eos_id" in saved else tokenizer.token_to_id(EOS_TOKEN)
    if eos_id is not None and (not isinstance(eos_id, int) or isinstance(eos_id, bool)):
        raise UserError(f"{run_dir / 'config.yaml'}: eos_id must be a token id or null")
    eos_ids = saved.get("eos_ids") or ([] if eos_id is None else [eos_id])
    if not (isinstance(eos_ids, list) and all(type(i) is int for i in eos_ids)):
        raise UserError(f"{run_dir / 'config.yaml'}: eos_ids must be a list of token ids")
    return LoadedModel(model, tokenizer, run_dir, ckpt, step, eos_id, eos_ids)


def stream_text(loaded: LoadedModel, prompt: str, console: Console | None, *,
                max_new_tokens: int, temperature: float, top_k: int | None,
                top_p: float | None, seed: int | None, eos_id: int | None) -> str:
    """Generate from ``prompt``; print text as it is made (if a console is given); return it."""
    tok = loaded.tokenizer
    ids = tok.encode(prompt).ids if prompt else []
    if not ids and eos_id is not None:
        ids = [eos_id]  # an empty prompt starts a fresh document, as in training
    out_ids: list[int] = []
    shown = ""
    stops = {*loaded.eos_ids, *([] if eos_id is None else [eos_id])}  # any of them ends it
    for token in generate(loaded.model, ids, max_new_tokens, temperature=temperature,
                          top_k=top_k, top_p=top_p, eos_id=stops, seed=seed):
        out_ids.append(token)
        text = tok.decode(out_ids)
        # A byte-level BPE token can end mid-character; wait for the rest of it.
        if console is not None and not text.endswith("\ufffd"):
            console.print(text[len(shown):], end="", markup=False, highlight=False, soft_wrap=True)
            shown = text
    text = tok.decode(out_ids)
    if console is not None and len(text) > len(shown):
        console.print(text[len(shown):], end="", markup=False, highlight=False, soft_wrap=True)
    return text

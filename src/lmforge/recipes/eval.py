"""Evaluate a run on a file: perplexity, greedy generations, or classification accuracy.

A `.txt` file, or JSONL rows with a "text" field, gives loss and perplexity over all tokens.
JSONL chat rows ({prompt, completion}, {messages}, {conversations}) give loss and perplexity
on the reply tokens (rendered with the run's chat template, as in training), then each prompt
(the conversation up to its last reply) is answered greedily and scored against that reply:
exact match, token Jaccard, ROUGE-1/2/L (rouge-score) and BLEU (sacrebleu). `--baseline RUN2`
evaluates a second run the same way and prints both side by side. A classifier run
(`finetune --task classify`) on {text, label} rows gives loss, accuracy and macro-F1. Results are
saved as eval_<data name>.json in the run folder.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from lmforge.api import Classifier
from lmforge.api import load as load_api
from lmforge.config import ConfigError, UserError
from lmforge.data.classify import classify_batch, classify_ids
from lmforge.data.sft import (
    encode_conversation,
    eval_batches,
    read_conversations,
    read_labeled,
    to_example,
)
from lmforge.eval.classify import class_metrics
from lmforge.eval.generation import generation_metrics
from lmforge.eval.lm import lm_loss
from lmforge.infer.chat import chat_setup
from lmforge.infer.generate import generate
from lmforge.run import LoadedModel, Placement, load_model, read_run_spec

EXAMPLES = """
lmforge eval --run runs/chat-lora --data test.jsonl --baseline runs/shakespeare
lmforge eval --run runs/shakespeare --data notes.txt
lmforge eval --run runs/minilm-vader --data data/vader/test.jsonl   # a classifier
"""


@dataclass
class Config(Placement):
    """Options of `lmforge eval`."""

    run: str = "runs/shakespeare"
    """The run to evaluate (a run folder or one of its checkpoints)."""
    data: str = "test.jsonl"
    """A .txt file, or JSONL of {text}, {prompt, completion}, {messages} or {conversations} rows."""
    baseline: str | None = None
    """A second run evaluated the same way, shown side by side."""
    template: str | None = None
    """Chat template: a built-in (chatml) or a .jinja file; null = each run's own, else chatml."""
    max_examples: int = 200
    """Evaluate at most this many rows (the first ones)."""
    max_new_tokens: int = 64
    """Longest generated reply."""
    batch_size: int = 8
    """Sequences per forward pass for the loss."""
    threads: int | None = None
    """CPU threads for torch; null = torch's default."""
    text_field: str = "text"
    """Classifier runs: the JSONL/CSV field holding the text."""
    label_field: str = "label"
    """Classifier runs: the field holding the label (a name the classifier was trained on)."""

    def __post_init__(self) -> None:
        if self.max_examples < 1 or self.max_new_tokens < 1 or self.batch_size < 1:
            raise ConfigError("max_examples, max_new_tokens and batch_size must be >= 1")


def _is_text(path: Path) -> bool:
    if path.suffix == ".txt":
        return True
    with path.open(encoding="utf-8") as f:
        first = next((line for line in f if line.strip()), "{}")
    try:
        row = json.loads(first)
    except ValueError:
        raise UserError(f"{path}:1: not valid JSON") from None
    return isinstance(row, dict) and "text" in row


def text_metrics(loaded: LoadedModel, path: Path, cfg: Config) -> dict[str, Any]:
    """Loss and perplexity over every token of a text file or JSONL "text" rows."""
    if path.suffix == ".txt":
        texts = [path.read_text(encoding="utf-8")]
    else:
        rows = [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]
        texts = [str(r.get("text", "")) for r in rows[: cfg.max_examples]]
    ids = torch.tensor([i for t in texts for i in loaded.tokenizer.encode(t).ids])  # type: ignore[attr-defined]
    window = loaded.model.cfg.block_size + 1
    chunks = [ids[k: k + window] for k in range(0, len(ids) - 1, window - 1)]
    batches = [(c[:-1][None], c[1:][None]) for c in chunks if len(c) > 1]
    if not batches:
        raise UserError(f"{path}: fewer than two tokens of text")
    loss, count = lm_loss(loaded.model, batches)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": count}


def _answer(loaded: LoadedModel, prompt: str, eot: str, max_new: int) -> str:
    """The greedy reply to a rendered prompt, cut at the end-of-turn string."""
    tok = loaded.tokenizer
    eot_id = tok.token_to_id(eot)  # type: ignore[attr-defined]
    stop = eot_id if eot_id is not None else loaded.eos_id
    ids = tok.encode(prompt, add_special_tokens=False).ids  # type: ignore[attr-defined]
    room = loaded.model.cfg.block_size - max_new
    ids = ids[-room:] if room > 0 else ids[-1:]  # keep the end: it holds the reply header
    out = list(generate(loaded.model, ids, max_new, temperature=0.0, eos_id=stop))
    text = tok.decode(out).split(eot)[0]  # type: ignore[attr-defined]
    # max_new_tokens can stop inside a multi-token end-of-turn ("<|im"): drop that tail too.
    cut = next((k for k in range(len(eot) - 1, 0, -1) if text.endswith(eot[:k])), 0)
    return text[: len(text) - cut].strip()


def chat_metrics(loaded: LoadedModel, path: Path, cfg: Config) -> dict[str, Any]:
    """Reply-token loss/perplexity, then greedy answers scored against the last reply."""
    read = read_conversations(path)
    if read.errors:
        raise UserError(f"{read.errors[0]}; see `lmforge data check {path}`")
    rows = read.rows[: cfg.max_examples]
    tok = loaded.tokenizer
    template, eot = chat_setup(loaded.run_dir, cfg.template, tok, loaded.eos_id)  # type: ignore[arg-type]
    max_len = loaded.model.cfg.block_size
    examples = [to_example(encode_conversation(r.messages, template, tok, eot), max_len)  # type: ignore[arg-type]
                for r in rows]
    examples = [e for e in examples if bool((e[1] != -100).any())]
    if not examples:
        raise UserError(f"{path}: no reply token fits in {max_len} tokens")
    pad = loaded.eos_id if loaded.eos_id is not None else 0
    loss, count = lm_loss(loaded.model, eval_batches(examples, cfg.batch_size, pad))
    preds, refs, samples = [], [], []
    for r in rows:
        prompt = template.render(r.messages[:-1], add_generation_prompt=True)
        preds.append(_answer(loaded, prompt, eot, cfg.max_new_tokens))
        refs.append(r.messages[-1]["content"])
        if len(samples) < 5:
            samples.append({"prompt": r.messages[-2]["content"], "reference": refs[-1],
                            "prediction": preds[-1]})
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": count,
            "examples": len(rows), **generation_metrics(preds, refs), "samples": samples}


def class_eval(clf: Classifier, path: Path, cfg: Config) -> dict[str, Any]:
    """Loss, accuracy and macro-F1 of a classifier on labelled rows (text cut as in training)."""
    texts, raw = read_labeled(path, cfg.text_field, cfg.label_field)
    texts, raw = texts[: cfg.max_examples], raw[: cfg.max_examples]
    unknown = sorted(set(raw) - set(clf.labels))
    if unknown:
        raise UserError(f"{path}: label {unknown[0]!r} is not one the classifier was trained on "
                        f"({clf.labels})")
    items = sorted(((torch.tensor(classify_ids(clf.tokenizer, t, clf.max_len)),
                     clf.labels.index(r)) for t, r in zip(texts, raw)), key=lambda r: len(r[0]))
    bs = cfg.batch_size
    batches = [classify_batch(items[k: k + bs], clf.pad_id) for k in range(0, len(items), bs)]
    metrics = class_metrics(clf.model, batches, prefix="eval")
    return {"examples": len(items), **{k.removeprefix("eval_"): v for k, v in metrics.items()}}


def evaluate_run(run: str, path: Path, cfg: Config) -> dict[str, Any]:
    """Every metric of one run on ``path``; written to <run>/eval_<name>.json."""
    from lmforge.utils.io import atomic_write_json

    spec = read_run_spec(run)
    t0 = time.time()
    if spec.kind == "classifier":
        clf = load_api(run, device=cfg.device, dtype=cfg.dtype)
        assert isinstance(clf, Classifier)
        metrics = class_eval(clf, path, cfg)
    else:
        loaded = load_model(run, cfg.device, cfg.dtype)
        metrics = (text_metrics(loaded, path, cfg) if _is_text(path)
                   else chat_metrics(loaded, path, cfg))
    result = {"run": str(spec.run_dir), "checkpoint": spec.checkpoint.name,
              "data": str(path), "seconds": round(time.time() - t0, 1), **metrics}
    atomic_write_json(spec.run_dir / f"eval_{path.stem}.json", result)
    return result


def main(cfg: Config) -> int:
    """Evaluate the run (and the baseline), print a side-by-side table."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    path = Path(cfg.data)
    if not path.is_file():
        raise UserError(f"data: {path}: no such file")
    results = [evaluate_run(cfg.run, path, cfg)]
    if cfg.baseline:
        results.append(evaluate_run(cfg.baseline, path, cfg))
    table = Table(title=f"{path.name}")
    table.add_column("metric")
    for r in results:
        table.add_column(Path(r["run"]).name, justify="right")
    for key, value in results[0].items():
        if isinstance(value, (int, float)) and key != "seconds":
            table.add_row(key, *(f"{r[key]:.4f}" if isinstance(r[key], float) else str(r[key])
                                 for r in results))
    console = Console()
    console.print(table)
    for s in results[0].get("samples", [])[:3]:
        console.print(f"{s['prompt']!r} -> {s['prediction']!r} (reference {s['reference']!r})",
                      markup=False, highlight=False)
    return 0

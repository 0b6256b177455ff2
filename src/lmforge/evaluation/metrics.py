"""Each kind of evaluation of one opened run: text perplexity, chat replies (loss, greedy answers
scored against the reference), a classifier, lm-evaluation-harness tasks, memorization."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path
from typing import Any

import torch

from lmforge.api import Classifier
from lmforge.config import UserError
from lmforge.data.classify import classify_batch, classify_ids
from lmforge.data.sft import (
    encode_conversation,
    eval_batches,
    read_conversations,
    read_labeled,
    to_example,
)
from lmforge.eval.classify import class_metrics
from lmforge.eval.fewshot import draw_shots, with_shots
from lmforge.eval.generation import generation_metrics
from lmforge.eval.lm import lm_loss, text_windows
from lmforge.evaluation.options import Config
from lmforge.infer.chat import chat_setup
from lmforge.infer.generate import generate
from lmforge.run import LoadedModel


def is_text(path: Path) -> bool:
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
    batches = text_windows(ids, loaded.model.cfg.block_size)
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
    shots = _shots(path, len(rows), cfg)
    preds, refs, samples = [], [], []
    for i, r in enumerate(rows):
        prompt = template.render(with_shots(r.messages[:-1], shots[i]),
                                 add_generation_prompt=True)
        preds.append(_answer(loaded, prompt, eot, cfg.max_new_tokens))
        refs.append(r.messages[-1]["content"])
        if len(samples) < 5:
            samples.append({"prompt": r.messages[-2]["content"], "reference": refs[-1],
                            "prediction": preds[-1]})
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": count,
            "examples": len(rows), "shots": cfg.shots or 0, **generation_metrics(preds, refs),
            "samples": samples}


def _shots(path: Path, n_rows: int, cfg: Config) -> list[list[list[dict[str, str]]]]:
    """Per evaluated row, the conversations of its shots (none without --shots)."""
    if not cfg.shots:
        return [[] for _ in range(n_rows)]
    source = Path(cfg.shots_file) if cfg.shots_file else path
    if not source.is_file():
        raise UserError(f"shots_file: {source}: no such file")
    read = read_conversations(source)
    if read.errors:
        raise UserError(f"{read.errors[0]}; see `lmforge data check {source}`")
    pool = [r.messages for r in read.rows]
    picks = draw_shots(n_rows, len(pool), cfg.shots, cfg.seed, exclude_self=source == path)
    return [[pool[j] for j in row] for row in picks]


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


def harness_eval(loaded: LoadedModel, cfg: Config) -> dict[str, Any]:
    """lm-evaluation-harness tasks on the run: flat "task metric" scores + the harness's JSON."""
    if importlib.util.find_spec("lm_eval") is None:
        raise UserError("--harness needs lm-evaluation-harness: pip install 'lmforge[harness]'")
    from lmforge.eval.harness import HarnessLM, run_tasks

    if loaded.eos_id is None:
        raise UserError(f"{loaded.run_dir}: has no EOS token id (config.yaml eos_id), which the "
                        "harness uses as the context of an empty prompt")
    template = None
    if cfg.harness_chat_template:
        template, _ = chat_setup(loaded.run_dir, cfg.template, loaded.tokenizer, loaded.eos_id)
    lm = HarnessLM(loaded.model, loaded.tokenizer, loaded.eos_id, loaded.bos_id,
                   cfg.batch_size, cfg.max_new_tokens, template, loaded.eos_ids)
    tasks = [t.strip() for t in (cfg.harness or "").split(",") if t.strip()]
    if not tasks:
        raise UserError("harness: name at least one task, e.g. --harness arc_easy")
    out = run_tasks(lm, tasks, cfg.harness_include, cfg.limit, cfg.shots, cfg.seed,
                    cfg.harness_chat_template)
    scores = {f"{task} {metric.removesuffix(',none')}": value
              for task, metrics in out["results"].items() for metric, value in metrics.items()
              if isinstance(value, float) and "stderr" not in metric}
    return {**scores, "harness": out}


def memorization_eval(loaded: LoadedModel, cfg: Config) -> dict[str, Any]:
    """The fraction of sampled training windows whose suffix greedy decoding reproduces."""
    import numpy as np

    from lmforge.config import load_yaml
    from lmforge.data.loader import TokenDataset
    from lmforge.eval.memorization import documents, memorization, sample_windows, summarize

    where = loaded.run_dir / "config.yaml"
    data = cfg.mem_data or load_yaml(where).get("data")
    if not isinstance(data, str):
        raise UserError(f"{where}: names no dataset folder (data); give --mem_data DIR")
    try:
        ds = TokenDataset.open(data)
    except UserError as e:
        raise UserError(f"{e} (the data of {where}; or give --mem_data DIR)") from None
    if ds.vocab_size > loaded.model.cfg.vocab_size:
        raise UserError(f"{ds.path}: tokens up to {ds.vocab_size} do not fit the run's vocabulary "
                        f"of {loaded.model.cfg.vocab_size}: not this run's data")
    arrays = ds.split(cfg.mem_split)
    docs = documents(arrays, ds.eos_id)
    windows = sample_windows(docs, cfg.mem_samples, cfg.mem_prefix + cfg.mem_suffix,
                             cfg.mem_from_start, np.random.default_rng(cfg.seed))
    rows = memorization(loaded.model, arrays, windows, cfg.mem_prefix, cfg.mem_suffix,
                        cfg.batch_size)
    decode = loaded.tokenizer.decode
    for r in rows:
        for key in ("prefix", "suffix", "generated"):
            r[key] = decode(r.pop(f"{key}_ids"))
    return {**summarize(rows, cfg.mem_suffix), "documents": len(docs),
            "settings": {"data": str(ds.path), "split": cfg.mem_split, "prefix": cfg.mem_prefix,
                         "suffix": cfg.mem_suffix, "seed": cfg.seed,
                         "from_start": cfg.mem_from_start},
            "windows": rows}


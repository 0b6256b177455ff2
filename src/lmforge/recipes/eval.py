"""Evaluate a run: perplexity, greedy generations, classification, lm_eval tasks, memorization.

A `.txt` file, or JSONL rows with a "text" field, gives loss and perplexity over all tokens.
JSONL chat rows ({prompt, completion}, {messages}, {conversations}) give loss and perplexity
on the reply tokens (rendered with the run's chat template, as in training), then each prompt
(the conversation up to its last reply) is answered greedily and scored against that reply:
exact match, token Jaccard, ROUGE-1/2/L (rouge-score) and BLEU (sacrebleu). `--baseline RUN2`
evaluates a second run the same way and prints both side by side. A classifier run
(`finetune --task classify`) on {text, label} rows gives loss, accuracy and macro-F1. Results are
saved as eval_<data name>.json in the run folder. `--shots K` puts K solved rows (of
`--shots_file`, else the other rows of --data; drawn with --seed) before each chat question.

`--harness TASKS` runs lm-evaluation-harness tasks (MMLU, HellaSwag, ARC, ... or your own YAMLs
in --harness_include) on the run instead, through lmforge's model adapter (eval_harness.json).
`--memorization` samples windows of the run's training data, prompts with the first
--mem_prefix tokens and reports the fraction whose next --mem_suffix tokens the model
reproduces verbatim, greedily (eval_memorization.json).
"""

from __future__ import annotations

import importlib.util
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
from lmforge.eval.fewshot import draw_shots, with_shots
from lmforge.eval.generation import generation_metrics
from lmforge.eval.lm import lm_loss, text_windows
from lmforge.infer.chat import chat_setup
from lmforge.infer.generate import generate
from lmforge.run import LoadedModel, Placement, load_model, read_run_spec

EXAMPLES = """
lmforge eval --run runs/chat-lora --data test.jsonl --baseline runs/shakespeare
lmforge eval --run runs/shakespeare --data notes.txt
lmforge eval --run runs/minilm-vader --data data/vader/test.jsonl   # a classifier
lmforge eval --run runs/chat-lora --data test.jsonl --shots 3 --shots_file train.jsonl
lmforge eval runs/smol --harness lmforge_mc --harness_include tests/data/harness
lmforge eval runs/smol --harness mmlu,hellaswag,arc_easy --shots 5 --limit 100   # online
lmforge eval runs/shakespeare --memorization
"""

POSITIONAL = ("run",)


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
    shots: int | None = None
    """Solved examples before each question: earlier chat turns for --data, num_fewshot for --harness; null = none for --data, each task's own default for --harness."""
    shots_file: str | None = None
    """--data: chat JSONL the shots are drawn from; null = the other rows of --data."""
    seed: int = 0
    """Seed of the shot draws (--data, --harness) and of the --memorization sample."""
    harness: str | None = None
    """lm-evaluation-harness tasks to run instead of --data, comma-separated (mmlu,hellaswag,arc_easy; hub tasks need their datasets online or cached). Needs pip install 'lmforge[harness]'."""
    harness_include: str | None = None
    """--harness: a folder of extra task YAMLs, e.g. tests/data/harness (lmforge_mc, offline)."""
    harness_chat_template: bool = False
    """--harness: render prompts with the run's chat template (the harness's default is plain text)."""
    limit: int | None = None
    """--harness: at most this many examples per task; null = all."""
    memorization: bool = False
    """Instead of --data: the fraction of training windows whose next mem_suffix tokens greedy decoding reproduces exactly from the first mem_prefix."""
    mem_samples: int = 100
    """--memorization: windows sampled (distinct; fewer if the data has fewer)."""
    mem_prefix: int = 32
    """--memorization: prompt tokens, the start of each window."""
    mem_suffix: int = 32
    """--memorization: tokens that must be reproduced exactly."""
    mem_from_start: bool = False
    """--memorization: windows open documents (one per document); else uniform over positions."""
    mem_data: str | None = None
    """--memorization: the prepared dataset folder; null = the `data` of the run's config.yaml."""
    mem_split: str = "train"
    """--memorization: split to sample (val gives a held-out control)."""

    def __post_init__(self) -> None:
        if self.max_examples < 1 or self.max_new_tokens < 1 or self.batch_size < 1:
            raise ConfigError("max_examples, max_new_tokens and batch_size must be >= 1")
        if min(self.mem_samples, self.mem_prefix, self.mem_suffix) < 1:
            raise ConfigError("mem_samples, mem_prefix and mem_suffix must be >= 1")
        if (self.shots is not None and self.shots < 0) or (self.limit is not None
                                                           and self.limit < 1):
            raise ConfigError("shots must be >= 0 and limit >= 1 (or null)")
        if self.harness is not None and self.memorization:
            raise ConfigError("harness and memorization: choose one per command")
        if self.harness is not None and self.shots_file is not None:
            raise ConfigError("shots_file: the harness draws shots from each task's own "
                              "fewshot split; drop --shots_file")


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


def _output_name(path: Path, cfg: Config) -> str:
    if cfg.harness is not None:
        return "eval_harness.json"
    if cfg.memorization:
        # one file per kind of sample, so the train/val/from-start reports sit side by side
        split = "" if cfg.mem_split == "train" else f"_{cfg.mem_split}"
        return f"eval_memorization{split}{'_starts' if cfg.mem_from_start else ''}.json"
    return f"eval_{path.stem}.json"


def evaluate_run(run: str, path: Path, cfg: Config) -> dict[str, Any]:
    """Every metric of one run on ``path`` (or the harness, or memorization); written to
    <run>/eval_<name>.json."""
    from lmforge.utils.io import atomic_write_json

    spec = read_run_spec(run)
    t0 = time.time()
    if cfg.harness is not None or cfg.memorization:
        loaded = load_model(run, cfg.device, cfg.dtype, cfg.quant)
        metrics = (harness_eval(loaded, cfg) if cfg.harness is not None
                   else memorization_eval(loaded, cfg))
    elif spec.kind == "classifier":
        clf = load_api(run, device=cfg.device, dtype=cfg.dtype, quant=cfg.quant)
        assert isinstance(clf, Classifier)
        metrics = class_eval(clf, path, cfg)
    else:
        loaded = load_model(run, cfg.device, cfg.dtype, cfg.quant)
        metrics = (text_metrics(loaded, path, cfg) if _is_text(path)
                   else chat_metrics(loaded, path, cfg))
    result = {"run": str(spec.run_dir), "checkpoint": spec.checkpoint.name,
              "data": str(path), "seconds": round(time.time() - t0, 1),
              **({"quant": cfg.quant} if cfg.quant != "none" else {}), **metrics}
    if cfg.harness is not None or cfg.memorization:
        del result["data"]
    atomic_write_json(spec.run_dir / _output_name(path, cfg), result)
    return result


def main(cfg: Config) -> int:
    """Evaluate the run (and the baseline), print a side-by-side table."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    path = Path(cfg.data)
    if cfg.harness is None and not cfg.memorization and not path.is_file():
        raise UserError(f"data: {path}: no such file")
    results = [evaluate_run(cfg.run, path, cfg)]
    if cfg.baseline:
        results.append(evaluate_run(cfg.baseline, path, cfg))
    title = _output_name(path, cfg).removeprefix("eval_").removesuffix(".json")
    table = Table(title=path.name if title == path.stem else title)
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
    for w in [w for w in results[0].get("windows", []) if w["exact"]][:3]:
        console.print(f"memorized: {w['prefix']!r} -> {w['generated']!r}", markup=False,
                      highlight=False)
    return 0

"""The model card (README.md) written into every export: what the model is, how it was made,
how well it did, how it was checked, and how to load it. One card for every kind of run: a
decoder, a BERT encoder (masked LM or classifier) and an encoder-decoder; only the
architecture table, the Hub header and the loading snippet differ.

Everything comes from the run folder (config.yaml, summary.json, metrics.jsonl, the data
folder's manifest.json when it is still there) and from the export itself; a missing file
leaves its section short, never an error. The YAML header is what the Hugging Face Hub reads.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmforge.checkpoint import read_meta
from lmforge.config import ConfigError, UserError, load_yaml
from lmforge.models.decoder import DecoderConfig
from lmforge.models.encoder import EncoderConfig
from lmforge.models.seq2seq import Seq2SeqConfig

CARD_FILE = "README.md"
# kind -> (Hub pipeline tag, transformers Auto class, what the model is, in words)
_KINDS = {
    "decoder": ("text-generation", "AutoModelForCausalLM", "A decoder-only language model"),
    "encoder": ("fill-mask", "AutoModelForMaskedLM", "A BERT encoder (masked language model)"),
    "classifier": ("text-classification", "AutoModelForSequenceClassification",
                   "A BERT text classifier"),
    "seq2seq": ("text2text-generation", "AutoModelForSeq2SeqLM",
                "An encoder-decoder (the Transformer of Vaswani et al. 2017)"),
}


@dataclass
class CardInfo:
    """What the card says about one export."""

    run_dir: Path
    checkpoint: Path
    cfg: DecoderConfig | EncoderConfig | Seq2SeqConfig
    params: int
    fmt: str  # hf | gguf | onnx
    precision: str  # e.g. "float32", "Q8_0 (norms F32)"
    check: str  # the load-back check, in words, with its max |Δlogits|
    files: list[str] = field(default_factory=list)
    repo: str | None = None  # a Hub repo name, for the loading snippets
    eos_id: int | None = None
    extra: dict[str, str] = field(default_factory=dict)  # format-specific facts (I/O names, ...)
    kind: str = "decoder"  # decoder | encoder | classifier | seq2seq (run.py's kinds)
    labels: list[str] = field(default_factory=list)  # a classifier's label names, in order


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _run_config(run_dir: Path) -> dict[str, Any]:
    try:
        return load_yaml(run_dir / "config.yaml")
    except ConfigError:
        return {}


def _last_eval(run_dir: Path) -> dict[str, Any]:
    """The last ``kind: eval`` line of metrics.jsonl, or {}."""
    last: dict[str, Any] = {}
    try:
        lines = (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    except OSError:
        return last
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and row.get("kind") == "eval":
            last = row
    return last


def _table(rows: list[tuple[str, Any]]) -> list[str]:
    return ["| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)]


def _architecture(info: CardInfo) -> list[str]:
    cfg, params = info.cfg, info.params
    if isinstance(cfg, EncoderConfig):
        return _table(_encoder_rows(cfg, params, info.labels))
    if isinstance(cfg, Seq2SeqConfig):
        return _table(_seq2seq_rows(cfg, params))
    return _table(_decoder_rows(cfg, params))


def _encoder_rows(cfg: EncoderConfig, params: int, labels: list[str]) -> list[tuple[str, Any]]:
    rows: list[tuple[str, Any]] = [
        ("family", "BERT (post-norm, learned positions, GELU)"), ("parameters", f"{params:,}"),
        ("layers", cfg.n_layer), ("width", cfg.n_embd), ("attention heads", cfg.n_head),
        ("MLP width", cfg.ffn_dim), ("context length", cfg.block_size),
        ("vocabulary", f"{cfg.vocab_size:,}"), ("token types", cfg.type_vocab_size)]
    if labels:
        rows.append(("labels", ", ".join(labels)))
    return rows


def _seq2seq_rows(cfg: Seq2SeqConfig, params: int) -> list[tuple[str, Any]]:
    return [
        ("family", f"Transformer encoder-decoder ({cfg.norm}-norm, sinusoidal positions, "
                   f"{cfg.activation} feed-forward)"),
        ("parameters", f"{params:,}"), ("encoder layers", cfg.n_encoder_layer),
        ("decoder layers", cfg.n_decoder_layer), ("width", cfg.n_embd),
        ("attention heads", cfg.n_head), ("feed-forward width", cfg.ffn_dim),
        ("max source / target length", cfg.block_size), ("vocabulary", f"{cfg.vocab_size:,}"),
        ("shared embeddings", cfg.tie_embeddings)]


def _decoder_rows(cfg: DecoderConfig, params: int) -> list[tuple[str, Any]]:
    llama = (cfg.pos, cfg.norm, cfg.mlp) == ("rope", "rmsnorm", "swiglu")
    family = "Llama-style (RMSNorm, RoPE, SwiGLU)" if llama else (
        f"{cfg.norm}, {cfg.pos} positions, {cfg.mlp} MLP")
    rows = [
        ("family", family), ("parameters", f"{params:,}"), ("layers", cfg.n_layer),
        ("width", cfg.n_embd), ("attention heads", cfg.n_head),
        ("key/value heads", cfg.kv_heads), ("head size", cfg.head_dim),
        ("MLP width", cfg.ffn_dim), ("context length", cfg.block_size),
        ("vocabulary", f"{cfg.vocab_size:,}"), ("tied embeddings", cfg.tie_embeddings),
    ]
    if cfg.pos == "rope":
        rows.append(("RoPE base", f"{cfg.rope_theta:g}"))
    if cfg.sliding_window is not None:
        where = ("" if cfg.local_layers is None
                 else f" on {len(cfg.local_layers)} of {cfg.n_layer} layers")
        rows.append(("sliding window", f"{cfg.sliding_window}{where}"))
    if cfg.bias or cfg.qkv_bias:
        rows.append(("biases", "all linear layers" if cfg.bias else "q/k/v only"))
    return rows


def _checkpoint_meta(checkpoint: Path) -> dict[str, Any]:
    try:
        return read_meta(checkpoint)
    except UserError:
        return {}


def _source(value: str) -> str:
    """A Hub name as is; a local path by its file name (a card is published, paths are not)."""
    return Path(value).name if Path(value).expanduser().exists() else value


def _data_line(run: dict[str, Any], run_dir: Path) -> str | None:
    data = run.get("data")
    if not isinstance(data, str):
        return None
    # The path is relative to where pretrain ran: usually the folder that holds runs/.
    manifest = next((m for m in (_read_json(base / data / "manifest.json")
                                 for base in (Path.cwd(), run_dir.parent.parent)) if m), {})
    splits = manifest.get("splits", {})
    inputs = ", ".join(map(str, manifest.get("inputs", [])))
    counts = ", ".join(f"{s['tokens']:,} {name} tokens" for name, s in splits.items()
                       if isinstance(s, dict) and "tokens" in s)
    details = "; ".join(x for x in (inputs and f"from {inputs}", counts) if x)
    return f"- data: `{data}`" + (f" ({details})" if details else "")


def _training(run_dir: Path, meta: dict[str, Any]) -> list[str]:
    """Where the weights came from: an import's source, or the training run's numbers."""
    run, summary = _run_config(run_dir), _read_json(run_dir / "summary.json")
    # A fine-tune keeps its options (base run, data, train, optim) under `finetune:`.
    opts = run["finetune"] if isinstance(run.get("finetune"), dict) else run
    lines = []
    if "source" in run:
        fmt = run.get("format", "Hugging Face")
        lines.append(f"- imported from `{_source(str(run['source']))}` ({fmt}, "
                     f"{run.get('architecture', '?')}); not trained by lmforge")
    if run.get("task") == "classify":
        lines.append(f"- task: classification fine-tune of `{_source(str(opts.get('run')))}`")
    elif run.get("objective") in ("mlm", "seq2seq"):
        lines.append(f"- objective: {run['objective']}")
    if run.get("preset"):
        lines.append(f"- preset: `{run['preset']}`")
    tuned = opts.get("data") if opts is not run else None  # a file: named, not its path
    data = _data_line(run, run_dir) if opts is run else (
        f"- data: `{_source(tuned)}`" if isinstance(tuned, str) else None)
    if data:
        lines.append(data)
    train = opts.get("train") if isinstance(opts.get("train"), dict) else {}
    if train:
        # What one batch row is: a source/target pair, a labelled text, or a token window.
        longest = run.get("max_len") or opts.get("max_len") or "block_size"
        row = ("source/target pairs" if run.get("objective") == "seq2seq" else
               f"examples of up to {longest} tokens" if opts is not run  # a fine-tune
               else f"x {train.get('seq_len') or 'block_size'} tokens")
        lines.append(f"- batch: {train.get('batch_size')} {row} x "
                     f"{train.get('grad_accum', 1)} accumulation; seed {train.get('seed')}")
    optim = opts.get("optim") if isinstance(opts.get("optim"), dict) else {}
    if optim:
        lines.append(f"- AdamW, peak lr {optim.get('lr')}, warmup {optim.get('warmup_steps')} "
                     f"steps, weight decay {optim.get('weight_decay')}")
    step, tokens = int(meta.get("step", 0)), meta.get("tokens")
    seconds = summary.get("seconds") if summary.get("steps") == step else None
    lines.append(f"- exported checkpoint: step {step:,}" + (f", {tokens:,} tokens" if tokens
                                                             else "")
                 + (f", {seconds:.0f} s of training" if seconds else ""))
    return lines


def _metrics(run_dir: Path, meta: dict[str, Any]) -> list[str]:
    """The exported checkpoint's own evaluation, else summary.json, else metrics.jsonl's last."""
    step = meta.get("step")
    summary = _read_json(run_dir / "summary.json")
    info = meta.get("info") if isinstance(meta.get("info"), dict) else {}
    own = info.get("metrics") if isinstance(info.get("metrics"), dict) else {}
    if "val_loss" in own:
        source, where = {**own, "step": step}, "the exported checkpoint's evaluation"
    elif "val_loss" in summary and summary.get("steps") == step:
        source, where = summary, "summary.json"
    else:
        source, where = _last_eval(run_dir), "the run's last evaluation (metrics.jsonl)"
    names = {"val_loss": "validation loss (nats/token)", "val_ppl": "validation perplexity",
             "val_bpb": "bits per byte", "unigram_baseline_loss": "unigram baseline loss",
             "val_accuracy": "validation accuracy", "val_macro_f1": "validation macro-F1",
             "val_exact_match": "validation greedy exact match",
             "test_accuracy": "test accuracy", "test_macro_f1": "test macro-F1"}
    rows = [f"| {label} | {source[k]:.4f} |" for k, label in names.items()
            if isinstance(source.get(k), (int, float))]
    if not rows:
        return ["No evaluation was recorded for this model."]
    step = f" at step {source['step']:,}" if "step" in source else ""
    return [f"From {where}{step}:", "", "| metric | value |", "|---|---|", *rows]


def _how_to_load(info: CardInfo) -> list[str]:
    where = info.repo or "path/to/this/folder"
    if info.fmt == "hf" and info.kind != "decoder":
        auto = _KINDS[info.kind][1]
        text = {"encoder": "The capital of France is [MASK]."}.get(info.kind, "Once upon a time")
        use = ("out = model.generate(**batch, max_new_tokens=40)",
               "print(tok.decode(out[0], skip_special_tokens=True))") if info.kind == "seq2seq" \
            else ("logits = model(**batch).logits",)
        return ["```python", f"from transformers import {auto}, AutoTokenizer", "",
                f'tok = AutoTokenizer.from_pretrained("{where}")',
                f'model = {auto}.from_pretrained("{where}")',
                f'batch = tok(["{text}"], return_tensors="pt")', *use, "```"]
    if info.fmt == "hf":
        return ["```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
                "", f'tok = AutoTokenizer.from_pretrained("{where}")',
                f'model = AutoModelForCausalLM.from_pretrained("{where}")',
                'ids = tok("Once upon a time", return_tensors="pt").input_ids',
                "print(tok.decode(model.generate(ids, max_new_tokens=40)[0]))", "```"]
    if info.fmt == "gguf":
        gguf_file = next((f for f in info.files if f.endswith(".gguf")), "model.gguf")
        hub = f"llama-cli -hf {info.repo}" if info.repo else None
        ollama = ["ollama create NAME -f Modelfile   # then: ollama run NAME"] if (
            "Modelfile" in info.files) else []
        return ["```bash", f'llama-cli -m {gguf_file} -p "Once upon a time" -n 40',
                *([hub] if hub else []), *ollama,
                f"lmforge import {gguf_file} --out runs/NAME   # back into lmforge", "```"]
    inputs = info.extra.get("inputs", "input_ids")
    return ["```python", "import numpy as np, onnxruntime as ort",
            "from tokenizers import Tokenizer", "",
            'tok = Tokenizer.from_file("tokenizer.json")',
            'session = ort.InferenceSession("model.onnx")',
            'ids = np.array([tok.encode("Once upon a time").ids], dtype=np.int64)',
            *(['feed = {"input_ids": ids}'] if inputs == "input_ids" else [
                "# empty past: (batch, kv_heads, 0, head_dim) float32 for each past input",
                "feed = {i.name: ids if i.name == \"input_ids\" else np.zeros("
                f"(1, {info.cfg.kv_heads}, 0, {info.cfg.head_dim}), np.float32)",
                "        for i in session.get_inputs()}"]),
            "logits = session.run(None, feed)[0]  # (batch, sequence, vocab)",
            "print(tok.decode([int(logits[0, -1].argmax())]))", "```"]


def model_card(info: CardInfo) -> str:
    """The README.md text for one export."""
    run_name = info.run_dir.resolve().name
    name = info.repo or run_name
    meta = _checkpoint_meta(info.checkpoint)
    tag = {"hf": "transformers", "gguf": "gguf", "onnx": "onnx"}[info.fmt]
    # The Hub reads this header; library_name only where a library loads the folder as is.
    library = ["library_name: transformers"] if info.fmt == "hf" else []
    pipeline, _, what = _KINDS[info.kind]
    header = ["---", *library, f"pipeline_tag: {pipeline}", "tags:", "- lmforge",
              f"- {tag}", "---", ""]
    body = [f"# {name}", "",
            f"{what} exported by lmforge from run `{run_name}` as "
            f"**{info.fmt}** ({info.precision}).", "", "## Architecture", "",
            *_architecture(info), "", "## Training", "",
            *_training(info.run_dir, meta), "", "## Metrics", "",
            *_metrics(info.run_dir, meta), "", "## This export", "",
            f"- files: {', '.join(f'`{f}`' for f in info.files)}",
            f"- precision: {info.precision}", f"- load-back check: {info.check}"]
    if info.eos_id is not None:
        body.append(f"- end-of-text token id: {info.eos_id}")
    body += [f"- {k}: {v}" for k, v in info.extra.items()]
    body += ["", "## How to load", "", *_how_to_load(info), ""]
    return "\n".join(header + body)

"""Pretrain a model from scratch: a decoder (clm), an encoder (mlm) or an encoder-decoder (seq2seq).

Builds the model from a named preset (overridable field by field with --model.* for decoders,
--encoder.* for encoders, --seq2seq.* for encoder-decoders), trains it with AdamW +
warmup/cosine through the one training loop, evaluates on held-out data, saves checkpoints,
metrics.jsonl and a loss-curve PNG under runs/<run>/, and ends with a report.

--objective clm (default): next-token prediction on a prepared dataset (`lmforge data prepare`);
val loss / perplexity / bits per byte, then samples. mlm: BERT's masked-token prediction on
the same kind of dataset; the tokenizer gains [PAD] [CLS] [SEP] [MASK] if it lacks them (new ids
after the existing ones, so the prepared shards stay valid); val loss and accuracy on masked
tokens with fixed masks. seq2seq: teacher-forced source -> target on a pairs folder
(`lmforge data synth`); val loss, token accuracy and greedy exact match on held-out pairs.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import shutil
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
import yaml
from rich.console import Console
from rich.panel import Panel
from rich.table import Table
from tokenizers import Tokenizer
from torch import Tensor, nn

from lmforge.checkpoint import (
    TrainState,
    checkpoint_weights,
    latest_checkpoint,
    save_checkpoint,
    save_sharded_checkpoint,
)
from lmforge.config import (
    ConfigError,
    DistConfig,
    OptimConfig,
    TrainConfig,
    UserError,
    load_yaml,
    merge,
    to_dict,
)
from lmforge.data.loader import RandomBatches, TokenDataset, eval_batches, unigram_baseline
from lmforge.data.mlm import (
    MLM_SPECIAL_TOKENS,
    MaskedBatches,
    Masker,
    MaskingConfig,
    MlmVocab,
    masked_eval_batches,
)
from lmforge.data.pairs import (
    BOS_TOKEN,
    PAD_TOKEN,
    SEQ2SEQ_SPECIAL_TOKENS,
    PairBatches,
    PairIds,
    encode_pairs,
    pair_eval_batches,
    pairs_folder,
    read_pairs,
)
from lmforge.data.tokenizer import EOS_TOKEN, load_tokenizer, vocab_size_of, with_special_tokens
from lmforge.eval.lm import make_lm_evaluator
from lmforge.infer.seq2seq_generate import generate_seq2seq
from lmforge.infer.text import stream_text
from lmforge.models.decoder import Decoder, DecoderConfig
from lmforge.models.encoder import EncoderConfig, EncoderForMaskedLM
from lmforge.models.registry import Family, preset, preset_names
from lmforge.models.seq2seq import Seq2Seq, Seq2SeqConfig
from lmforge.plan import TrainSettings
from lmforge.run import LoadedModel, read_run_spec
from lmforge.train.loop import LoopHooks
from lmforge.train.losses import LossFn, causal_lm_loss, token_loss
from lmforge.train.oom import oom_report
from lmforge.train.schedule import resolved
from lmforge.train.session import run_training
from lmforge.train.setup import (
    Setup,
    data_ranks,
    gather_full,
    load_state,
    resolve_strategy,
    setup_training,
)
from lmforge.utils.dist import DistInfo, barrier, init_distributed, shutdown
from lmforge.utils.io import atomic_write_json, atomic_write_text
from lmforge.utils.logging import read_metrics, truncate_metrics
from lmforge.utils.plot import plot_loss_curve
from lmforge.utils.seed import seed_everything
from lmforge.utils.trackers import check_trackers

Objective = Literal["clm", "mlm", "seq2seq"]
OBJECTIVES: tuple[Objective, ...] = ("clm", "mlm", "seq2seq")
# The model section each objective reads; the other two must be left alone.
SECTIONS = ("model", "encoder", "seq2seq")
# Val masks are the same for every run (whatever --train.seed), so runs compare on equal terms.
VAL_MASK_SEED = 0

EXAMPLES = """
lmforge pretrain --data data/shakespeare --run shakespeare
lmforge pretrain --data data/shakespeare --run small --preset llama-1m --train.max_steps 500
lmforge pretrain --run shakespeare --resume            # continue from the latest checkpoint
lmforge pretrain --config runs/shakespeare/config.yaml --run again   # reproduce a run
lmforge pretrain --objective mlm --preset bert-mini --data data/shakespeare --run bert
lmforge data synth --task reverse --out data/reverse
lmforge pretrain --objective seq2seq --data data/reverse --run reverse
"""

DEFAULTS_NOTE = {"model": "from --preset", "encoder": "from --preset", "seq2seq": "from --preset"}


def _family(objective: str) -> tuple[Family, str, str]:
    """(model family, its config section, its default preset) for an objective."""
    return {
        "clm": ("decoder", "model", "llama-1m"),
        "mlm": ("encoder", "encoder", "bert-mini"),
        "seq2seq": ("seq2seq", "seq2seq", "transformer-tiny"),
    }[objective]  # type: ignore[return-value]


@dataclass
class Config:
    """Options of `lmforge pretrain`."""

    objective: Objective = "clm"
    """What to learn: clm = next token (decoder), mlm = masked tokens (BERT encoder), seq2seq = source -> target pairs (encoder-decoder)."""
    data: str = "data/shakespeare"
    """clm/mlm: a prepared dataset folder (`lmforge data prepare`); seq2seq: a pairs folder with train.jsonl, val.jsonl, tokenizer.json (`lmforge data synth`)."""
    run: str = "shakespeare"
    """Run name: config, metrics, checkpoints and plots go to <runs_dir>/<run>/."""
    runs_dir: str = "runs"
    """Folder that holds all runs."""
    init_from: str | None = None
    """Continued pretraining (--objective clm): start from this run or imported model (a run folder or one of its checkpoints) — its architecture and weights — instead of a fresh init. Prepare the data with its tokenizer: `lmforge data prepare --tokenizer RUN/tokenizer.json`. --model.* may still change what does not change a weight's shape (dropout, rope_theta)."""
    preset: str | None = None
    """Named model preset of the objective's family; null = llama-1m (clm), bert-mini (mlm), transformer-tiny (seq2seq). Decoders: llama-1m, llama-6m, llama-15m, gpt2-124m; encoders: bert-tiny, bert-mini, bert-small, bert-base; encoder-decoders: transformer-tiny, transformer-small, transformer-base."""
    model: DecoderConfig = field(default_factory=DecoderConfig)
    """Decoder architecture for --objective clm (filled from --preset)."""
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    """Encoder architecture for --objective mlm (filled from --preset)."""
    seq2seq: Seq2SeqConfig = field(default_factory=Seq2SeqConfig)
    """Encoder-decoder architecture for --objective seq2seq (filled from --preset)."""
    mlm: MaskingConfig = field(default_factory=MaskingConfig)
    """Masking of --objective mlm."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer and schedule."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Training loop."""
    dist: DistConfig = field(default_factory=DistConfig)
    """Distributed training under torchrun (DDP or FSDP2)."""
    resume: bool = False
    """Continue an existing run from its latest checkpoint: weights, optimizer, schedule, data
    position and RNG, so the result is the same as an uninterrupted run."""
    overwrite: bool = False
    """Delete an existing run of the same name and start over."""
    samples: list[str] = field(default_factory=lambda: ["ROMEO.\n", "To be, or not to be"])
    """clm: prompts to sample from at the end of training (comma-separated on the command line)."""
    sample_tokens: int = 120
    """clm: tokens generated per end-of-run sample."""
    temperature: float = 0.8
    """clm: sampling temperature of the end-of-run samples."""

    def __post_init__(self) -> None:
        if not self.run or "/" in self.run or self.run.startswith("."):
            raise ConfigError(f"run: '{self.run}' is not a valid run name (no '/', not hidden)")
        if self.resume and self.overwrite:
            raise ConfigError("resume and overwrite contradict each other; choose one")
        if self.sample_tokens < 0 or self.temperature < 0:
            raise ConfigError("sample_tokens and temperature must be >= 0")

    @property
    def section(self) -> str:
        """The name of the model section this objective uses."""
        return _family(self.objective)[1]

    @property
    def model_cfg(self) -> DecoderConfig | EncoderConfig | Seq2SeqConfig:
        """The architecture this objective trains."""
        return getattr(self, self.section)


def resolve(data: dict[str, Any]) -> dict[str, Any]:
    """Fill the objective's model section from the preset, underneath what the user set."""
    objective = data.get("objective", "clm")
    if objective not in OBJECTIVES:
        raise ConfigError(f"objective: must be one of {', '.join(OBJECTIVES)}; got {objective!r}")
    family, section, default = _family(objective)
    for other in (*SECTIONS, "mlm"):
        if other not in _used_sections(objective) and data.get(other):
            raise ConfigError(f"{other}.*: options of a section that --objective {objective} "
                              f"does not use; its model options are --{section}.*")
    if data.get("init_from"):
        return _from_run(data, objective)
    name = data.get("preset") or default
    if not isinstance(name, str):
        raise ConfigError(f"preset: must be a name, one of {', '.join(preset_names(family))}")
    base = to_dict(preset(name, family))
    return {**data, "preset": name, section: merge(base, data.get(section) or {})}


def _from_run(data: dict[str, Any], objective: str) -> dict[str, Any]:
    """--init_from: the model section is the run's own, under what the user set."""
    if objective != "clm":
        raise ConfigError("init_from: continued pretraining starts a decoder (--objective clm)")
    if data.get("preset"):
        raise ConfigError("init_from, preset: the architecture comes from --init_from; drop "
                          "--preset")
    spec = read_run_spec(str(data["init_from"]))
    if spec.kind != "decoder":
        raise ConfigError(f"init_from: {spec.run_dir} is {spec.kind} run, not a decoder")
    return {**data, "model": merge(to_dict(spec.model_cfg), data.get("model") or {})}


def _used_sections(objective: str) -> set[str]:
    return {_family(objective)[1], *(["mlm"] if objective == "mlm" else [])}


def saved_config(cfg: Config) -> dict[str, Any]:
    """The config to write beside the run: without the sections its objective does not use."""
    unused = {*SECTIONS, "mlm"} - _used_sections(cfg.objective)
    return {k: v for k, v in to_dict(cfg).items() if k not in unused}


# --------------------------------------------------------------------------- what an objective brings


class Batches(Protocol):
    """A resumable stream of training batches."""

    def __next__(self) -> tuple[Any, Tensor]: ...

    def state_dict(self) -> dict[str, Tensor]: ...

    def load_state_dict(self, d: dict[str, Tensor]) -> None: ...


@dataclass
class Task:
    """Everything that differs between objectives; the rest of ``main`` is shared."""

    build: Callable[[], nn.Module]  # the model (built on the meta device by train.setup)
    params: int
    batches: Batches
    loss_fn: LossFn
    evaluate: Callable[[nn.Module], dict[str, float]]
    tokenizer: Tokenizer
    describe: str  # one line: architecture and data
    baseline: float | None  # unigram loss of the data (clm, mlm), drawn on the loss plot
    # end-of-run metrics + print, on rank 0 with the whole trained model
    report: Callable[[Console, dict[str, Any], nn.Module], dict[str, Any]]
    flops_per_token: float | None = None  # training FLOPs per token, for MFU
    weights: Mapping[str, Tensor] | None = None  # the starting weights (--init_from)


def on_meta(build: Callable[[], nn.Module]) -> nn.Module:
    """The model's skeleton (shapes and counts, no memory)."""
    with torch.device("meta"):
        return build()


def _forward(model: nn.Module, x: Tensor | tuple[Tensor, ...]) -> Tensor:
    """The model on a batch input: one tensor, or a tuple of positional arguments."""
    return model(*x) if isinstance(x, tuple) else model(x)


@torch.no_grad()
def token_metrics(model: nn.Module, batches: Iterable[tuple[Any, Tensor]]) -> dict[str, float]:
    """Mean cross-entropy, perplexity and argmax accuracy over the labelled positions."""
    was_training = model.training
    model.eval()
    total, correct, count = 0.0, 0, 0
    for x, y in batches:
        logits = _forward(model, x)  # (B, T, V)
        total += float(nn.functional.cross_entropy(logits.flatten(0, 1).float(), y.flatten(),
                                                   ignore_index=-100, reduction="sum"))
        labelled = y != -100
        correct += int(((logits.argmax(dim=-1) == y) & labelled).sum())
        count += int(labelled.sum())
    model.train(was_training)
    if count == 0:
        raise ValueError("no labelled tokens to evaluate")
    loss = total / count
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0)), "val_accuracy": correct / count}


def _seq_len(cfg: Config, block_size: int, least: int) -> int:
    seq_len = cfg.train.seq_len or block_size
    if seq_len > block_size:
        raise ConfigError(f"train.seq_len {seq_len} exceeds {cfg.section}.block_size {block_size}")
    if seq_len < least:
        raise ConfigError(f"train.seq_len: must be at least {least} for --objective "
                          f"{cfg.objective}, got {seq_len}")
    return seq_len


def _check_data(ds: TokenDataset, window: int, cfg: Config) -> None:
    for split in ("train", "val"):
        n = ds.num_tokens(split)
        if n < window + 1:
            raise UserError(f"{cfg.data}: the {split} split has {n} tokens, fewer than one "
                            f"sequence of {window + 1}; lower --train.seq_len or add data")


# --------------------------------------------------------------------------- clm


def clm_task(cfg: Config, info: DistInfo) -> tuple[Config, Task]:
    """Next-token prediction with a decoder on a prepared token dataset."""
    ds = TokenDataset.open(cfg.data)
    weights = _init_weights(cfg, ds) if cfg.init_from else None
    mcfg = dataclasses.replace(cfg.model, vocab_size=ds.vocab_size)
    cfg = dataclasses.replace(cfg, model=mcfg)
    seq_len = _seq_len(cfg, mcfg.block_size, 2)
    _check_data(ds, seq_len, cfg)
    build = functools.partial(Decoder, mcfg)
    model = on_meta(build)
    assert isinstance(model, Decoder)
    tc = cfg.train
    batches = RandomBatches(ds.split("train"), tc.batch_size, seq_len, tc.seed,
                            rank=info.rank, world_size=info.world_size)
    evaluate = make_lm_evaluator(
        lambda: eval_batches(ds.split("val"), tc.batch_size, seq_len, tc.eval_tokens),
        ds.bytes_per_token("val"),
    )
    tokens = tc.batch_size * tc.grad_accum * seq_len * info.world_size
    origin = f"decoder from {cfg.init_from}" if cfg.init_from else f"{cfg.preset} decoder"
    describe = (f"{origin}, {model.num_params() / 1e6:.2f}M parameters "
                f"({model.num_params(non_embedding=True) / 1e6:.2f}M non-embedding), vocab "
                f"{mcfg.vocab_size}, context {seq_len}; {tc.max_steps} steps x {tokens} tokens "
                f"= {tc.max_steps * tokens / 1e6:.1f}M tokens "
                f"(train split: {ds.num_tokens('train') / 1e6:.2f}M)")
    baseline = unigram_baseline(ds.split("train"), ds.split("val"), ds.vocab_size)
    tok = load_tokenizer(ds.tokenizer_path)

    def report(console: Console, summary: dict[str, Any], trained: nn.Module) -> dict[str, Any]:
        final = evaluate(trained)
        _clm_report(console, cfg, trained, tok, ds, {**summary, **final}, baseline)
        return final

    return cfg, Task(build, model.num_params(), batches, causal_lm_loss(tc.label_smoothing),
                     evaluate, tok, describe, baseline, report, model.flops_per_token(seq_len),
                     weights)


def _init_weights(cfg: Config, ds: TokenDataset) -> Mapping[str, Tensor]:
    """The --init_from run's weights (read tensor by tensor), once its tokenizer is the data's."""
    spec = read_run_spec(str(cfg.init_from))
    theirs = load_tokenizer(spec.tokenizer).get_vocab()
    if load_tokenizer(ds.tokenizer_path).get_vocab() != theirs:
        raise UserError(f"{cfg.data}: was not prepared with the tokenizer of {spec.run_dir}; "
                        f"prepare it with `lmforge data prepare ... --tokenizer "
                        f"{spec.tokenizer}`")
    return checkpoint_weights(spec.checkpoint)


def _clm_report(console: Console, cfg: Config, model: nn.Module, tok: Tokenizer,
                ds: TokenDataset, summary: dict[str, Any], baseline: float) -> None:
    loaded = LoadedModel(model.eval(), tok, Path(cfg.runs_dir) / cfg.run, Path(),
                         summary["steps"])
    for i, prompt in enumerate(cfg.samples):
        text = stream_text(loaded, prompt, None, max_new_tokens=cfg.sample_tokens,
                           temperature=cfg.temperature, top_k=50, top_p=None,
                           seed=cfg.train.seed + i, eos_id=ds.eos_id)
        console.print(Panel(prompt + text, title=f"sample {i + 1}: {prompt.strip()!r}",
                            expand=False))
    t = _table(cfg, summary, "val loss (nats/token)", "perplexity", "bits/byte")
    t.add_row("model", f"{summary['val_loss']:.4f}", f"{summary['val_ppl']:.2f}",
              f"{summary.get('val_bpb', float('nan')):.4f}")
    bpt = ds.bytes_per_token("val")
    t.add_row("unigram baseline", f"{baseline:.4f}", f"{math.exp(baseline):.2f}",
              f"{baseline / math.log(2) / bpt:.4f}")
    console.print(t)
    run_dir = Path(cfg.runs_dir) / cfg.run
    console.print(f"saved to {run_dir}/ (config.yaml, metrics.jsonl, loss.png, checkpoints/); "
                  f"try: lmforge generate --run {run_dir} --prompt 'ROMEO.'")


def _table(cfg: Config, summary: dict[str, Any], *columns: str) -> Table:
    t = Table(title=f"run {cfg.run}: {summary['steps']} steps, {summary['tokens'] / 1e6:.2f}M "
                    f"tokens, {summary['seconds']:.0f} s, {summary['tokens_per_s']:.0f} tokens/s")
    t.add_column("")
    for c in columns:
        t.add_column(c, justify="right")
    return t


# --------------------------------------------------------------------------- mlm


def mlm_task(cfg: Config, info: DistInfo) -> tuple[Config, Task]:
    """BERT masked-token prediction with an encoder on a prepared token dataset."""
    ds = TokenDataset.open(cfg.data)
    tok, _ = with_special_tokens(load_tokenizer(ds.tokenizer_path), MLM_SPECIAL_TOKENS)
    vocab = MlmVocab.from_tokenizer(tok)
    mcfg = dataclasses.replace(cfg.encoder, vocab_size=vocab.vocab_size)
    cfg = dataclasses.replace(cfg, encoder=mcfg)
    seq_len = _seq_len(cfg, mcfg.block_size, 3)
    window = seq_len - 2  # [CLS] window [SEP]
    _check_data(ds, window, cfg)
    build = functools.partial(EncoderForMaskedLM, mcfg)
    model = on_meta(build)
    assert isinstance(model, EncoderForMaskedLM)
    tc = cfg.train
    masker = Masker(cfg.mlm, vocab)
    windows = RandomBatches(ds.split("train"), tc.batch_size, window, tc.seed,
                            rank=info.rank, world_size=info.world_size)
    # A seed of its own, so the masks are not drawn from the same stream as the window starts.
    batches = MaskedBatches(windows, masker, tc.seed + 1)

    def evaluate(m: nn.Module) -> dict[str, float]:
        val = eval_batches(ds.split("val"), tc.batch_size, window, tc.eval_tokens)
        return token_metrics(m, masked_eval_batches(val, masker, VAL_MASK_SEED))

    tokens = tc.batch_size * tc.grad_accum * seq_len * info.world_size
    describe = (f"{cfg.preset} encoder (masked LM), {model.num_params() / 1e6:.2f}M parameters,"
                f" vocab {mcfg.vocab_size} ({ds.vocab_size} + special tokens), sequence "
                f"{seq_len}, {cfg.mlm.probability:.0%} masked; {tc.max_steps} steps x {tokens} "
                f"tokens (train split: {ds.num_tokens('train') / 1e6:.2f}M)")
    baseline = unigram_baseline(ds.split("train"), ds.split("val"), ds.vocab_size)

    def report(console: Console, summary: dict[str, Any], trained: nn.Module) -> dict[str, Any]:
        final = evaluate(trained)
        t = _table(cfg, {**summary, **final}, "masked-token loss", "accuracy")
        t.add_row("model", f"{final['val_loss']:.4f}", f"{final['val_accuracy']:.1%}")
        t.add_row("unigram baseline", f"{baseline:.4f}", "")
        console.print(t)
        return final

    return cfg, Task(build, model.num_params(), batches, token_loss(tc.label_smoothing),
                     evaluate, tok, describe, baseline, report)


# --------------------------------------------------------------------------- seq2seq


def seq2seq_task(cfg: Config, info: DistInfo) -> tuple[Config, Task]:
    """Teacher-forced source -> target training of an encoder-decoder on a pairs folder."""
    if cfg.train.seq_len is not None:
        raise ConfigError("train.seq_len: not used by --objective seq2seq (pairs are padded per "
                          "batch; the limit is --seq2seq.block_size); leave it null")
    train_path, val_path, tok_path = pairs_folder(cfg.data)
    tok, sp = with_special_tokens(load_tokenizer(tok_path), SEQ2SEQ_SPECIAL_TOKENS)
    ids = PairIds(sp[PAD_TOKEN], sp[BOS_TOKEN], sp[EOS_TOKEN])
    mcfg = dataclasses.replace(cfg.seq2seq, vocab_size=vocab_size_of(tok))
    cfg = dataclasses.replace(cfg, seq2seq=mcfg)
    train_items, dropped = encode_pairs(tok, read_pairs(train_path), ids, mcfg.block_size)
    val_items, val_dropped = encode_pairs(tok, read_pairs(val_path), ids, mcfg.block_size)
    if not val_items:
        raise UserError(f"{val_path}: every pair is longer than block_size "
                        f"{mcfg.block_size}; raise --seq2seq.block_size")
    build = functools.partial(Seq2Seq, mcfg)
    model = on_meta(build)
    assert isinstance(model, Seq2Seq)
    tc = cfg.train
    batches = PairBatches(train_items, tc.batch_size, ids, tc.seed)
    val_eval = _first_tokens(val_items, tc.eval_tokens)

    def evaluate(m: nn.Module) -> dict[str, float]:
        metrics = token_metrics(m, pair_eval_batches(val_eval, tc.batch_size, ids))
        return {**metrics, "val_exact_match": exact_match(m, val_eval, ids, tc.batch_size)}

    describe = (f"{cfg.preset} encoder-decoder ({mcfg.norm}-norm), {model.num_params() / 1e6:.2f}M "
                f"parameters, vocab {mcfg.vocab_size}; {len(train_items):,} train / "
                f"{len(val_items):,} val pairs ({dropped + val_dropped} longer than block_size "
                f"{mcfg.block_size} dropped); {tc.max_steps} steps x {tc.batch_size} pairs")

    def report(console: Console, summary: dict[str, Any], trained: nn.Module) -> dict[str, Any]:
        final = token_metrics(trained, pair_eval_batches(val_items, tc.batch_size, ids))
        final["val_exact_match"] = exact_match(trained, val_items, ids, tc.batch_size, console,
                                               tok)
        t = _table(cfg, {**summary, **final}, "val loss", "token accuracy",
                   "greedy exact match")
        t.add_row(f"model ({len(val_items)} held-out pairs)", f"{final['val_loss']:.4f}",
                  f"{final['val_accuracy']:.1%}", f"{final['val_exact_match']:.1%}")
        console.print(t)
        return final

    return cfg, Task(build, model.num_params(), batches, token_loss(tc.label_smoothing),
                     evaluate, tok, describe, None, report)


def _first_tokens(items: list[tuple[list[int], list[int]]],
                  max_tokens: int) -> list[tuple[list[int], list[int]]]:
    """The leading pairs holding about ``max_tokens`` labels (at least one pair)."""
    out, count = [], 0
    for item in items:
        if out and count >= max_tokens:
            break
        out.append(item)
        count += len(item[1]) + 1
    return out


def exact_match(model: nn.Module, items: list[tuple[list[int], list[int]]], ids: PairIds,
                batch_size: int, console: Console | None = None,
                tok: Tokenizer | None = None, show: int = 3) -> float:
    """Share of pairs whose greedy (cached) decoding is exactly the target; print a few."""
    assert isinstance(model, Seq2Seq)
    was_training = model.training
    model.eval()
    hits = 0
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        longest = max(len(t) for _, t in chunk) + 1  # a correct output ends with EOS by then
        outs = generate_seq2seq(model, [s for s, _ in chunk], longest, ids.bos, ids.eos, ids.pad)
        hits += sum(out == t for out, (_, t) in zip(outs, chunk))
        if console is not None and tok is not None and start == 0:
            for (s, t), out in list(zip(chunk, outs))[:show]:
                mark = "[green]ok[/]" if out == t else "[red]wrong[/]"
                console.print(f"{mark}  {tok.decode(s)}  ->  {tok.decode(out)}"
                              + ("" if out == t else f"   (want: {tok.decode(t)})"),
                              highlight=False)
    model.train(was_training)
    return hits / len(items)


# --------------------------------------------------------------------------- set-up


def _prepare_run_dir(cfg: Config, run_dir: Path) -> None:
    """Refuse to clobber a run by accident; check a resumed run has the same model."""
    if cfg.resume:
        if not (run_dir / "config.yaml").is_file():
            raise UserError(f"--resume: {run_dir} is not an existing run; drop --resume to start it")
        saved_all = load_yaml(run_dir / "config.yaml")
        if saved_all.get("objective", "clm") != cfg.objective:
            raise UserError(f"--resume: the run was trained with --objective "
                            f"{saved_all.get('objective', 'clm')}, not {cfg.objective}; resume "
                            f"with the run's config (--config {run_dir}/config.yaml --resume)")
        saved = saved_all.get(cfg.section, {})
        for key, value in to_dict(cfg.model_cfg).items():
            if saved.get(key) != value:
                raise UserError(f"--resume: {cfg.section}.{key} is {value!r} but the run was "
                                f"trained with {saved.get(key)!r}; resume with the run's config "
                                f"(--config {run_dir}/config.yaml --resume)")
        return
    if run_dir.exists():
        if not cfg.overwrite:
            raise UserError(f"run '{cfg.run}' already exists in {run_dir}; pass --resume to "
                            "continue it, --overwrite to start over, or choose another --run")
        shutil.rmtree(run_dir)


def _with_length(cfg: Config, data_ranks: DistInfo) -> Config:
    """cfg with train.epochs / optim.warmup_ratio resolved into max_steps / warmup_steps."""
    tc, per_epoch = cfg.train, 0.0
    if tc.epochs is not None and cfg.objective == "seq2seq":  # pairs, not split by rank
        per_epoch = len(read_pairs(pairs_folder(cfg.data)[0])) / (tc.batch_size * tc.grad_accum)
    elif tc.epochs is not None:  # a row reads seq_len tokens ([CLS] window [SEP] for mlm)
        row = (tc.seq_len or cfg.model_cfg.block_size) - (2 if cfg.objective == "mlm" else 0)
        per_epoch = TokenDataset.open(cfg.data).num_tokens("train") / (
            tc.batch_size * tc.grad_accum * row * data_ranks.world_size)
    train_cfg, optim_cfg = resolved(tc, cfg.optim, per_epoch)
    return dataclasses.replace(cfg, train=train_cfg, optim=optim_cfg)


def _build_task(cfg: Config, info: DistInfo) -> tuple[Config, Task]:
    if info.distributed and cfg.objective == "seq2seq":
        raise UserError("--objective seq2seq does not split its pairs by rank yet; "
                        "train it in one process (without torchrun)")
    builder = {"clm": clm_task, "mlm": mlm_task, "seq2seq": seq2seq_task}[cfg.objective]
    return builder(cfg, info)


# --------------------------------------------------------------------------- main


def _resume(cfg: Config, setup: Setup, batches: Batches, run_dir: Path,
            console: Console, info: DistInfo) -> TrainState:
    ckpt = latest_checkpoint(run_dir) if cfg.resume else None
    if ckpt is None:
        return TrainState()
    state, extra, _ = load_state(setup, ckpt)
    batches.load_state_dict({k.removeprefix("loader."): v for k, v in extra.items()
                             if k.startswith("loader.")})
    if info.is_main:  # the steps after the checkpoint will be logged again
        truncate_metrics(run_dir / "metrics.jsonl", state.step)
    console.print(f"resumed {run_dir} from {ckpt.name} (step {state.step})")
    return state


def _save(cfg: Config, task: Task, setup: Setup, run_dir: Path, st: TrainState,
          metrics: dict[str, float]) -> None:
    """The loop's save hook: a checkpoint (sharded under FSDP / TP) and the loss plot."""
    extra = {f"loader.{k}": v for k, v in task.batches.state_dict().items()}
    meta = {"metrics": metrics, "preset": cfg.preset, "objective": cfg.objective}
    best = metrics.get("val_loss") is not None and metrics["val_loss"] == st.best_val_loss
    if setup.sharded:  # collective: each rank writes its own shard
        save_sharded_checkpoint(run_dir, st, setup.module, setup.optimizer, extra, meta,
                                cfg.train.keep_last, is_best=best)
    elif setup.info.is_main:
        save_checkpoint(run_dir, st, setup.module, setup.optimizer, extra, meta,
                        cfg.train.keep_last, is_best=best)
    if setup.info.is_main:
        plot_loss_curve(read_metrics(run_dir / "metrics.jsonl"), run_dir / "loss.png",
                        title=f"{cfg.run} ({cfg.preset}, {cfg.objective})",
                        baseline=task.baseline)


def main(cfg: Config) -> int:
    """Train, evaluate, save and report; see the module docstring."""
    info = init_distributed(cfg.dist.device)
    try:
        return _main(cfg, info)
    finally:
        shutdown(info)


def _main(cfg: Config, info: DistInfo) -> int:
    console = Console(quiet=not info.is_main)
    strategy = resolve_strategy(cfg.dist, info, "pretrain",
                                cfg.model if cfg.objective == "clm" else None)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    gen = seed_everything(cfg.train.seed)
    cfg = _with_length(cfg, data_ranks(info, cfg.dist.tp))  # --train.epochs -> max_steps
    # reads and checks the data; batches are split over data-parallel ranks
    cfg, task = _build_task(cfg, data_ranks(info, cfg.dist.tp))
    # collective; may still refuse (a checkpoint, the optimizer): before touching the disk
    setup = setup_training(task.build, info=info, strategy=strategy, train_cfg=cfg.train,
                           dist_cfg=cfg.dist, optim_cfg=cfg.optim, generator=gen,
                           weights=task.weights)
    run_dir = Path(cfg.runs_dir) / cfg.run
    if info.is_main:
        check_trackers(cfg.train.trackers)
        _prepare_run_dir(cfg, run_dir)  # every check above passed: only now touch the disk
        run_dir.mkdir(parents=True, exist_ok=True)
    barrier(info)
    state = _resume(cfg, setup, task.batches, run_dir, console, info)
    if info.is_main:
        atomic_write_text(run_dir / "config.yaml",
                          yaml.safe_dump(saved_config(cfg), sort_keys=False))
        atomic_write_text(run_dir / "tokenizer.json", task.tokenizer.to_str())
    console.print(f"[bold]{cfg.run}[/]: {task.describe}"
                  + (f"; {strategy} over {info.world_size} processes" if info.distributed else ""))
    t0 = time.time()
    start_tokens = state.tokens
    try:
        hooks = LoopHooks(task.evaluate, functools.partial(_save, cfg, task, setup, run_dir))
        state = run_training(setup, task.batches, task.loss_fn, cfg.train, cfg.optim, state, hooks,
                             run_dir=run_dir, name=cfg.run, console=console,
                             config=saved_config(cfg), tp=cfg.dist.tp,
                             flops_per_token=task.flops_per_token)
    except torch.OutOfMemoryError:
        _explain_oom(cfg, info, console)
        raise UserError("CUDA out of memory; see the breakdown and settings above") from None
    except KeyboardInterrupt:
        last = latest_checkpoint(run_dir)
        where = f"the last checkpoint is {last.name}" if last else "no checkpoint was saved yet"
        raise UserError(f"interrupted; {where}; continue with the same command and --resume") from None
    elapsed = time.time() - t0
    trained = gather_full(setup, task.build)  # collective; the whole model on rank 0 only
    if trained is not None:
        _summarize(cfg, task, trained, state, state.tokens - start_tokens, elapsed, run_dir,
                   console)
    return 0


def _summarize(cfg: Config, task: Task, trained: nn.Module, state: TrainState,
               new_tokens: int, elapsed: float, run_dir: Path, console: Console) -> None:
    """The final report (samples, tables) and summary.json; rank 0, on the whole model."""
    # tokens = labelled (predicted) tokens: every token for clm, the masked ones for mlm,
    # target tokens + EOS for seq2seq.
    summary: dict[str, Any] = {
        "run": cfg.run, "objective": cfg.objective, "preset": cfg.preset,
        "params": task.params, "steps": state.step,
        "tokens": state.tokens, "seconds": round(elapsed, 1),
        "tokens_per_s": round(new_tokens / max(elapsed, 1e-9), 1)}
    summary.update(task.report(console, summary, trained))
    if task.baseline is not None:
        summary["unigram_baseline_loss"] = task.baseline
    atomic_write_json(run_dir / "summary.json", summary)
    keys = ("val_loss", "val_accuracy", "val_exact_match", "unigram_baseline_loss")
    console.print(json.dumps({k: summary[k] for k in keys if k in summary}))


def _explain_oom(cfg: Config, info: DistInfo, console: Console) -> None:
    """Print where the memory went and settings that would fit (decoder runs)."""
    if cfg.objective != "clm" or not info.device.startswith("cuda"):
        return
    settings = TrainSettings(batch_size=cfg.train.batch_size, seq_len=cfg.train.seq_len,
                             grad_accum=cfg.train.grad_accum,
                             precision=cfg.train.precision,
                             activation_checkpointing=cfg.train.activation_checkpointing,
                             gpus=info.world_size, tp=cfg.dist.tp,
                             strategy="fsdp" if cfg.dist.strategy == "fsdp" or info.world_size > cfg.dist.tp > 1
                             else "ddp")
    total = torch.cuda.get_device_properties(info.device).total_memory
    for line in oom_report(cfg.model, settings, total):
        console.print(line, markup=False)

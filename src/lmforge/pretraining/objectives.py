"""What differs between pretraining objectives (clm, mlm, seq2seq): model, batches, loss,
evaluation and the end-of-run report, bundled as a ``Task``."""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from rich.console import Console
from rich.panel import Panel
from rich.table import Table
from tokenizers import Tokenizer
from torch import Tensor, nn

from lmforge.checkpoint import (
    checkpoint_weights,
)
from lmforge.config import (
    ConfigError,
    UserError,
)
from lmforge.data.loader import TokenDataset, eval_batches, unigram_baseline
from lmforge.data.mlm import (
    MLM_SPECIAL_TOKENS,
    MaskedBatches,
    Masker,
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
from lmforge.models.decoder import Decoder
from lmforge.models.encoder import EncoderForMaskedLM
from lmforge.models.seq2seq import Seq2Seq
from lmforge.pretraining.options import VAL_MASK_SEED, Config
from lmforge.run import LoadedModel, read_run_spec
from lmforge.train.losses import LossFn, causal_lm_loss, token_loss
from lmforge.utils.dist import DistInfo

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
    batches = ds.random_batches("train", tc.batch_size, seq_len, tc.seed,
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
    windows = ds.random_batches("train", tc.batch_size, window, tc.seed,
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



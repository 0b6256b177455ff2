"""--task chat: a decoder on prompt/completion, messages or ShareGPT rows (full, LoRA, QLoRA)."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from tokenizers import Tokenizer
from torch import nn

from lmforge.checkpoint import TrainState, checkpoint_weights
from lmforge.config import (
    UserError,
    to_dict,
)
from lmforge.data.check import CheckReport, check_sft, refusals
from lmforge.data.sft import SftBatches, eval_batches, to_example
from lmforge.data.tokenizer import load_tokenizer
from lmforge.eval.lm import lm_loss, lm_metrics
from lmforge.finetuning.common import (
    finish_run,
    resume_from,
    save_adapter,
    setup_run,
    start_run_dir,
    with_length,
)
from lmforge.finetuning.options import Config
from lmforge.infer.chat import ChatTemplate, chat_setup
from lmforge.models.decoder import Decoder
from lmforge.models.lora import lora_info
from lmforge.models.quant import nf4_summary, storage_bytes
from lmforge.run import (
    LoadedModel,
    RunSpec,
    read_run_spec,
    write_run_files,
)
from lmforge.train.finetune import (
    adapt,
    adapted_builder,
    data_digest,
    save_resumable,
)
from lmforge.train.loop import EvalFn, LoopHooks
from lmforge.train.losses import LossFn, causal_lm_loss, packed_lm_loss
from lmforge.train.session import run_training
from lmforge.train.setup import (
    Setup,
    data_ranks,
)
from lmforge.utils.dist import DistInfo
from lmforge.utils.io import atomic_write_json
from lmforge.utils.logging import read_metrics
from lmforge.utils.plot import plot_loss_curve


def checked_data(cfg: Config, tok: Tokenizer, template: ChatTemplate, eot: str,
                 max_len: int) -> CheckReport:
    """The data check; a bad row or a refusal is a UserError before anything is written."""
    report = check_sft(cfg.data, tok, template, eot, max_len)
    if report.errors:
        more = f" (and {len(report.errors) - 1} more)" if len(report.errors) > 1 else ""
        raise UserError(f"{report.errors[0]}{more}; see `lmforge data check {cfg.data}`")
    reasons = refusals(report, eot)
    if reasons:
        raise UserError("; ".join(reasons))
    return report


def _split(report: CheckReport, max_len: int, val_fraction: float,
           seed: int) -> tuple[list, list]:
    examples = [to_example(e, max_len) for e in report.encoded]
    examples = [e for e in examples if bool((e[1] != -100).any())]  # cut to nothing: skip
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = int(len(examples) * val_fraction)
    if n_val == 0 or n_val == len(examples):
        return [examples[i] for i in order], []
    return [examples[i] for i in order[n_val:]], [examples[i] for i in order[:n_val]]


@dataclass
class DecoderTask:
    """What a decoder fine-tuning task brings to the shared run (chat, or preference pairs):
    its data, loss and evaluation. ``attach`` is called once the model is set up and returns
    the train batches and the evaluation (full DPO computes its reference log-probs there)."""

    train_size: int
    val_size: int
    data_summary: dict[str, Any]
    describe: str
    """The console's words on the data, e.g. '8% of tokens carry loss'."""
    loss_fn: LossFn
    attach: Callable[[Setup], tuple[Iterator[Any], EvalFn | None]]
    report: Callable[[dict[str, float], dict[str, float]], str]
    """(val metrics before, after) -> the last console line."""


@dataclass
class DecoderBase:
    """The base decoder run a task fine-tunes, its tokenizer and chat template."""

    spec: RunSpec
    tok: Tokenizer
    template: ChatTemplate
    eot: str
    max_len: int
    pad_id: int


def decoder_base(cfg: Config) -> DecoderBase:
    """The --run folder as a decoder base; a refusal when it is another kind of run."""
    spec = read_run_spec(cfg.run)
    if spec.kind != "decoder":
        raise UserError(f"{spec.run_dir}: is a {spec.kind} run; --task {cfg.task} fine-tunes a "
                        "decoder (for an encoder: --task classify)")
    tok = load_tokenizer(spec.tokenizer)
    template, eot = chat_setup(spec.run_dir, cfg.template, tok, spec.eos_id)
    max_len = min(cfg.max_len or spec.model_cfg.block_size, spec.model_cfg.block_size)
    return DecoderBase(spec, tok, template, eot, max_len,
                       spec.eos_id if spec.eos_id is not None else 0)


def chat_main(cfg: Config, console: Console, dist: DistInfo) -> int:
    """Check the chat data, then fine-tune on it through ``train_decoder``."""
    base = decoder_base(cfg)
    report = checked_data(cfg, base.tok, base.template, base.eot, base.max_len)
    train_ex, val_ex = _split(report, base.max_len, cfg.val_fraction, cfg.train.seed)
    ranks = data_ranks(dist, 1)
    batches = SftBatches(train_ex, cfg.train.batch_size, base.max_len, base.pad_id,
                         cfg.train.seed, cfg.pack, cfg.group_by_length, ranks.rank,
                         ranks.world_size)
    val = eval_batches(val_ex, cfg.train.batch_size, base.pad_id)
    evaluate = (lambda m: lm_metrics(lm_loss(m, val)[0], None)) if val else None
    loss = packed_lm_loss if cfg.pack else causal_lm_loss  # packed x = (ids, segments)
    summary = report.summary()
    task = DecoderTask(
        len(train_ex), len(val_ex), summary,
        f"{summary['loss_fraction']:.0%} of tokens carry loss", loss(cfg.train.label_smoothing),
        lambda setup: (batches, evaluate),
        lambda before, after: (f"val loss on reply tokens: {before.get('val_loss')} -> "
                               f"{after.get('val_loss')}"))
    return train_decoder(cfg, console, dist, base, task)


def train_decoder(cfg: Config, console: Console, dist: DistInfo, base_run: DecoderBase,
                  task: DecoderTask) -> int:
    """Adapt the base, train the task through the one loop, write the run folder."""
    spec, max_len = base_run.spec, base_run.max_len
    cfg = with_length(cfg, task.train_size, data_ranks(dist, 1).world_size)
    build = functools.partial(Decoder, spec.model_cfg)
    adapted: list[str] = []
    adapt_fn = lambda m: adapted.__setitem__(slice(None), adapt(m, cfg.method, cfg.lora,  # noqa: E731
                                                               cfg.base_dtype))
    setup = setup_run(cfg, dist, build, adapt_fn, checkpoint_weights(spec.checkpoint), None)
    batches, evaluate = task.attach(setup)
    run_dir = Path(cfg.runs_dir) / cfg.out
    start_run_dir(cfg, run_dir, dist)  # every check passed: only now touch the disk
    digest = data_digest(cfg.data, cfg.val_data)
    state, done = resume_from(cfg, setup, run_dir, batches, digest, console)
    before = done["before"] if "before" in done else (evaluate(setup.model) if evaluate else {})
    nf4 = nf4_summary(setup.module)  # qlora: which NF4 implementation stores the base
    info = {"base_run": str(spec.run_dir.resolve()), "method": cfg.method,
            "lora": lora_info(cfg.lora), "adapted": adapted,
            **({"nf4_backend": nf4["backend"]} if nf4 else {})}
    skeleton = on_meta_decoder(build)  # shapes, counts, FLOPs: no memory
    base = LoadedModel(skeleton, base_run.tok, spec.run_dir, spec.checkpoint, spec.step,
                       spec.eos_id, spec.bos_id, list(spec.eos_ids))
    if dist.is_main:
        write_run_files(run_dir, base, base_run.template, {"finetune": to_dict(cfg)})
    meta = {"method": cfg.method, "before": before, "data_sha256": digest}
    last: dict[str, float] = {}  # the loop's evaluation at its last step

    def save(state: TrainState, metrics: dict[str, float]) -> None:
        last.clear()
        last.update(metrics)
        save_resumable(run_dir, state, setup, {"metrics": metrics, **meta}, cfg.train.keep_last)
        if adapted and dist.is_main and not setup.sharded:
            save_adapter(run_dir, setup.module, info)

    total = sum(p.numel() for p in skeleton.parameters())
    trainable = sum(p.numel() for p in setup.module.parameters() if p.requires_grad)
    console.print(f"[bold]{cfg.out}[/]: {cfg.method} fine-tuning ({cfg.task}) of "
                  f"{spec.run_dir}; {trainable:,} of {total:,} parameters train; "
                  f"{task.train_size} train / {task.val_size} val examples, {task.describe}"
                  + (f"; {setup.strategy} over {dist.world_size} processes"
                     if dist.distributed else "") + _nf4_line(nf4))
    t0 = time.time()
    state = run_training(setup, batches, task.loss_fn, cfg.train, cfg.optim,
                         state, LoopHooks(evaluate, save), run_dir=run_dir, name=cfg.out,
                         console=console, config=to_dict(cfg),
                         flops_per_token=skeleton.flops_per_token(max_len))
    # the loop evaluated the final weights already, unless it had no step left to run
    after = last or (evaluate(setup.model) if evaluate else {})
    trained = finish_run(cfg, setup, state, adapted_builder(build, adapt_fn), run_dir,
                         {"metrics": after, **meta})
    if trained is None:
        return 0
    if adapted and setup.sharded:
        save_adapter(run_dir, trained, info)
    plot_loss_curve(read_metrics(run_dir / "metrics.jsonl"), run_dir / "loss.png",
                    title=f"{cfg.out} ({cfg.method})")
    summary = {"run": cfg.out, "task": cfg.task, "method": cfg.method,
               "base_run": info["base_run"], "trainable_params": trainable, "params": total,
               "steps": state.step, "tokens": state.tokens,
               "seconds": round(time.time() - t0, 1), "val_loss_before": before.get("val_loss"),
               "val_loss": after.get("val_loss"), "val_before": before, "val_after": after,
               "data": task.data_summary, "model_bytes": storage_bytes(setup.module),
               **({"nf4": nf4} if nf4 else {})}
    atomic_write_json(run_dir / "summary.json", summary)
    console.print(task.report(before, after))
    return 0


def _nf4_line(nf4: dict[str, Any]) -> str:
    """The console's note of how a QLoRA base is stored ('' for other methods)."""
    if not nf4:
        return ""
    how = "double quantization" if nf4["double_quant"] else "fp32 block maxima"
    return (f"; base in NF4 by {nf4['backend']} ({how}, {nf4['bits_per_weight']:.3f} bits per "
            f"weight over {nf4['matrices']} matrices)")


def on_meta_decoder(build: Callable[[], nn.Module]) -> Decoder:
    """The base decoder's skeleton: shapes, counts and FLOPs, no memory."""
    with torch.device("meta"):
        model = build()
    assert isinstance(model, Decoder)
    return model



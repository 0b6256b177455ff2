"""Pretrain a decoder language model from scratch on a prepared dataset.

Builds the model from a named preset (overridable field by field with --model.*), trains it with
AdamW + warmup/cosine through the one training loop, evaluates val loss / perplexity / bits per
byte, saves checkpoints, metrics.jsonl and a loss-curve PNG under runs/<run>/, and ends by
printing samples and the val loss next to the unigram baseline of the same data.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.panel import Panel
from rich.table import Table

from lmforge.checkpoint import (
    TrainState,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from lmforge.config import (
    ConfigError,
    OptimConfig,
    TrainConfig,
    UserError,
    load_yaml,
    merge,
    save_yaml,
    to_dict,
)
from lmforge.data.loader import RandomBatches, TokenDataset, eval_batches, unigram_baseline
from lmforge.eval.lm import make_lm_evaluator
from lmforge.models.decoder import Decoder, DecoderConfig
from lmforge.models.registry import preset, preset_names
from lmforge.recipes.common import LoadedModel, stream_text
from lmforge.train.loop import LoopHooks, causal_lm_loss, train
from lmforge.train.optim import build_optimizer
from lmforge.utils.io import atomic_write_json, atomic_write_text
from lmforge.utils.logging import RunLogger, read_metrics
from lmforge.utils.plot import plot_loss_curve
from lmforge.utils.seed import seed_everything

DEFAULT_PRESET = "llama-1m"

EXAMPLES = """
lmforge pretrain --data data/shakespeare --run shakespeare
lmforge pretrain --data data/shakespeare --run small --preset llama-1m --train.max_steps 500
lmforge pretrain --run shakespeare --resume            # continue from the latest checkpoint
lmforge pretrain --config runs/shakespeare/config.yaml --run again   # reproduce a run
"""

DEFAULTS_NOTE = {"model": "from --preset"}


@dataclass
class Config:
    """Options of `lmforge pretrain`."""

    data: str = "data/shakespeare"
    """Prepared dataset folder (the output of `lmforge data prepare`)."""
    run: str = "shakespeare"
    """Run name: config, metrics, checkpoints and plots go to <runs_dir>/<run>/."""
    runs_dir: str = "runs"
    """Folder that holds all runs."""
    preset: str = DEFAULT_PRESET
    """Named model preset; --model.* options override single fields of it. Presets: llama-1m,
    llama-6m, llama-15m, gpt2-124m (see the README)."""
    model: DecoderConfig = field(default_factory=DecoderConfig)
    """Model architecture (filled from --preset)."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer and schedule."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Training loop."""
    resume: bool = False
    """Continue an existing run from its latest checkpoint: weights, optimizer, schedule, data
    position and RNG, so the result is the same as an uninterrupted run."""
    overwrite: bool = False
    """Delete an existing run of the same name and start over."""
    samples: list[str] = field(default_factory=lambda: ["ROMEO.\n", "To be, or not to be"])
    """Prompts to sample from at the end of training (comma-separated on the command line)."""
    sample_tokens: int = 120
    """Tokens generated per end-of-run sample."""
    temperature: float = 0.8
    """Sampling temperature of the end-of-run samples."""

    def __post_init__(self) -> None:
        if not self.run or "/" in self.run or self.run.startswith("."):
            raise ConfigError(f"run: '{self.run}' is not a valid run name (no '/', not hidden)")
        if self.resume and self.overwrite:
            raise ConfigError("resume and overwrite contradict each other; choose one")
        if self.sample_tokens < 0 or self.temperature < 0:
            raise ConfigError("sample_tokens and temperature must be >= 0")


def resolve(data: dict[str, Any]) -> dict[str, Any]:
    """Fill the model section from the preset, underneath what the user set."""
    name = data.get("preset", DEFAULT_PRESET)
    if not isinstance(name, str):
        raise ConfigError(f"preset: must be a name, one of {', '.join(preset_names())}")
    base = to_dict(preset(name))
    return {**data, "model": merge(base, data.get("model") or {})}


# --------------------------------------------------------------------------- set-up


def _prepare_run_dir(cfg: Config, run_dir: Path) -> None:
    """Refuse to clobber a run by accident; check a resumed run has the same model."""
    if cfg.resume:
        if not (run_dir / "config.yaml").is_file():
            raise UserError(f"--resume: {run_dir} is not an existing run; drop --resume to start it")
        saved = load_yaml(run_dir / "config.yaml").get("model", {})
        for key, value in to_dict(cfg.model).items():
            if saved.get(key) != value:
                raise UserError(f"--resume: model.{key} is {value!r} but the run was trained "
                                f"with {saved.get(key)!r}; resume with the run's config "
                                f"(--config {run_dir}/config.yaml --resume)")
        return
    if run_dir.exists():
        if not cfg.overwrite:
            raise UserError(f"run '{cfg.run}' already exists in {run_dir}; pass --resume to "
                            "continue it, --overwrite to start over, or choose another --run")
        shutil.rmtree(run_dir)


def _build_model(mcfg: DecoderConfig, gen: torch.Generator) -> Decoder:
    # Build on the meta device (no memory, no wasted init), then materialize and initialize once.
    with torch.device("meta"):
        model = Decoder(mcfg)
    model.to_empty(device="cpu")
    model.init_weights(gen)
    return model


def _check_data(ds: TokenDataset, seq_len: int, cfg: Config) -> None:
    for split in ("train", "val"):
        n = ds.num_tokens(split)
        if n < seq_len + 1:
            raise UserError(f"{cfg.data}: the {split} split has {n} tokens, fewer than one "
                            f"sequence of {seq_len + 1}; lower --train.seq_len or add data")


# --------------------------------------------------------------------------- main


def main(cfg: Config) -> int:
    """Train, evaluate, save and sample; see the module docstring."""
    console = Console()
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    ds = TokenDataset.open(cfg.data)
    mcfg = dataclasses.replace(cfg.model, vocab_size=ds.vocab_size)
    cfg = dataclasses.replace(cfg, model=mcfg)
    seq_len = cfg.train.seq_len or mcfg.block_size
    if seq_len > mcfg.block_size:
        raise ConfigError(f"train.seq_len {seq_len} exceeds model.block_size {mcfg.block_size}")
    _check_data(ds, seq_len, cfg)
    run_dir = Path(cfg.runs_dir) / cfg.run
    _prepare_run_dir(cfg, run_dir)  # every check above passed: only now touch the disk

    gen = seed_everything(cfg.train.seed)
    model = _build_model(mcfg, gen)
    optimizer = build_optimizer(model, cfg.optim)
    batches = RandomBatches(ds.split("train"), cfg.train.batch_size, seq_len, cfg.train.seed)
    state = TrainState()

    run_dir.mkdir(parents=True, exist_ok=True)
    if cfg.resume and (ckpt := latest_checkpoint(run_dir)) is not None:
        state, extra, _ = load_checkpoint(ckpt, model, optimizer)
        batches.load_state_dict({k.removeprefix("loader."): v for k, v in extra.items()
                                 if k.startswith("loader.")})
        console.print(f"resumed {run_dir} from {ckpt.name} (step {state.step})")
    atomic_write_text(run_dir / "config.yaml", save_yaml(cfg))
    shutil.copyfile(ds.tokenizer_path, run_dir / "tokenizer.json")

    n_params = model.num_params()
    tokens_per_step = cfg.train.batch_size * cfg.train.grad_accum * seq_len
    console.print(
        f"[bold]{cfg.run}[/]: {cfg.preset} decoder, {n_params / 1e6:.2f}M parameters "
        f"({model.num_params(non_embedding=True) / 1e6:.2f}M non-embedding), vocab "
        f"{mcfg.vocab_size}, context {seq_len}; {cfg.train.max_steps} steps x "
        f"{tokens_per_step} tokens = {cfg.train.max_steps * tokens_per_step / 1e6:.1f}M tokens "
        f"(train split: {ds.num_tokens('train') / 1e6:.2f}M)"
    )
    baseline = unigram_baseline(ds.split("train"), ds.split("val"), ds.vocab_size)
    evaluate = make_lm_evaluator(
        lambda: eval_batches(ds.split("val"), cfg.train.batch_size, seq_len, cfg.train.eval_tokens),
        ds.bytes_per_token("val"),
    )

    def save(st: TrainState, metrics: dict[str, float]) -> None:
        save_checkpoint(run_dir, st, model, optimizer,
                        extra={f"loader.{k}": v for k, v in batches.state_dict().items()},
                        info={"metrics": metrics, "preset": cfg.preset},
                        keep_last=cfg.train.keep_last,
                        is_best=metrics.get("val_loss") is not None
                        and metrics["val_loss"] == st.best_val_loss)
        plot_loss_curve(read_metrics(run_dir / "metrics.jsonl"), run_dir / "loss.png",
                        title=f"{cfg.run} ({cfg.preset})", baseline=baseline)

    t0 = time.time()
    start_step = state.step
    try:
        with RunLogger(run_dir / "metrics.jsonl", cfg.train.max_steps, console,
                       start_step=state.step) as log:
            state = train(model, optimizer, batches, causal_lm_loss(cfg.train.label_smoothing),
                          cfg.train, cfg.optim, state, log, LoopHooks(evaluate, save))
    except KeyboardInterrupt:
        last = latest_checkpoint(run_dir)
        where = f"the last checkpoint is {last.name}" if last else "no checkpoint was saved yet"
        raise UserError(f"interrupted; {where}; continue with the same command and --resume") from None
    elapsed = time.time() - t0
    final = evaluate(model)
    summary = {"run": cfg.run, "preset": cfg.preset, "params": n_params, "steps": state.step,
               "tokens": state.tokens, "seconds": round(elapsed, 1),
               "tokens_per_s": round((state.step - start_step) * tokens_per_step
                                     / max(elapsed, 1e-9), 1),
               **final, "unigram_baseline_loss": baseline}
    atomic_write_json(run_dir / "summary.json", summary)
    _report(console, cfg, model, ds, summary)
    return 0


def _report(console: Console, cfg: Config, model: Decoder, ds: TokenDataset,
            summary: dict[str, Any]) -> None:
    loaded = LoadedModel(model.eval(), _tokenizer(ds), Path(cfg.runs_dir) / cfg.run,
                         Path(), summary["steps"])
    for i, prompt in enumerate(cfg.samples):
        text = stream_text(loaded, prompt, None, max_new_tokens=cfg.sample_tokens,
                           temperature=cfg.temperature, top_k=50, top_p=None,
                           seed=cfg.train.seed + i, eos_id=ds.eos_id)
        console.print(Panel(prompt + text, title=f"sample {i + 1}: {prompt.strip()!r}",
                            expand=False))
    t = Table(title=f"run {cfg.run}: {summary['steps']} steps, {summary['tokens'] / 1e6:.2f}M "
                    f"tokens, {summary['seconds']:.0f} s, {summary['tokens_per_s']:.0f} tokens/s")
    t.add_column("")
    t.add_column("val loss (nats/token)", justify="right")
    t.add_column("perplexity", justify="right")
    t.add_column("bits/byte", justify="right")
    t.add_row("model", f"{summary['val_loss']:.4f}", f"{summary['val_ppl']:.2f}",
              f"{summary.get('val_bpb', float('nan')):.4f}")
    base = summary["unigram_baseline_loss"]
    bpt = ds.bytes_per_token("val")
    t.add_row("unigram baseline", f"{base:.4f}", f"{torch.tensor(base).exp():.2f}",
              f"{base / 0.6931471805599453 / bpt:.4f}")
    console.print(t)
    run_dir = Path(cfg.runs_dir) / cfg.run
    console.print(f"saved to {run_dir}/ (config.yaml, metrics.jsonl, loss.png, checkpoints/); "
                  f"try: lmforge generate --run {run_dir} --prompt 'ROMEO.'")
    console.print(json.dumps({k: summary[k] for k in ("val_loss", "unigram_baseline_loss")}))


def _tokenizer(ds: TokenDataset) -> object:
    from lmforge.data.tokenizer import load_tokenizer

    return load_tokenizer(ds.tokenizer_path)

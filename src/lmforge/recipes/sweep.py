"""Run short pretraining runs over a grid of one or two options and compare their val loss.

Each grid point is a real `lmforge pretrain` run, executed in this process through the pretrain
recipe and named <name>-<i> under the runs folder (with its own config, metrics, checkpoints
and loss curve). Every grid point's config is built and checked before the first run starts.
The table of final val loss per setting is printed and saved with a plot as
<runs_dir>/<name>/sweep.json and sweep.png (both rewritten after every run). A run that
diverges is recorded as such and the sweep goes on.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from lmforge.config import ConfigError, UserError, build, leaf_names
from lmforge.pretraining import main as pretrain_main
from lmforge.pretraining import options as pretrain
from lmforge.utils.io import atomic_write_json
from lmforge.utils.plot import plot_sweep

EXAMPLES = """
lmforge sweep --name lr --grid optim.lr=1e-3,2e-3,4e-3,8e-3 --base 'preset=llama-1m train.max_steps=100'
lmforge sweep --name lr-bs --grid optim.lr=2e-3,4e-3 --grid2 train.batch_size=8,16 --base 'config=base.yaml'
lmforge sweep --name depth --grid model.n_layer=2,4,8 --base='--preset llama-1m --train.max_steps 200'
"""

# Options a grid or the base may not set: the sweep names and places its runs itself.
RESERVED = ("run", "runs_dir", "resume", "overwrite")


@dataclass
class Config:
    """Options of `lmforge sweep`."""

    name: str = "sweep"
    """Sweep name: runs are <runs_dir>/<name>-0, -1, ...; results go to <runs_dir>/<name>/."""
    grid: str = ""
    """The swept pretrain option and its values, e.g. optim.lr=1e-3,2e-3,4e-3 (required)."""
    grid2: str | None = None
    """An optional second option crossed with the first, e.g. train.batch_size=8,16."""
    base: str = ""
    """Pretrain options shared by every run: 'preset=llama-1m train.max_steps=100' (config=FILE.yaml
    reads a YAML base), or with dashes after '=': --base='--preset llama-1m --train.max_steps 100'."""
    runs_dir: str = "runs"
    """Folder that holds the runs and the sweep's results."""
    overwrite: bool = False
    """Replace existing runs and results of a sweep with the same name."""

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name or self.name.startswith("."):
            raise ConfigError(f"name: '{self.name}' is not a valid sweep name (no '/', not hidden)")
        if not self.grid:
            raise ConfigError("grid: required, e.g. --grid optim.lr=1e-3,2e-3,4e-3")


@dataclass
class Point:
    """One grid point: its settings and the pretrain config that runs it."""

    index: int
    settings: dict[str, Any]
    cfg: pretrain.Config


# --------------------------------------------------------------------------- parsing


def parse_grid(text: str, where: str) -> tuple[str, list[str]]:
    """'optim.lr=1e-3,2e-3' -> ('optim.lr', ['1e-3', '2e-3']), checking the option name."""
    key, eq, values = text.partition("=")
    key = key.strip().removeprefix("--")
    items = [v.strip() for v in values.split(",") if v.strip()]
    if not eq or not key or not items:
        raise ConfigError(f"{where}: '{text}' must look like option=value1,value2 "
                          "(e.g. optim.lr=1e-3,2e-3)")
    if key in RESERVED:
        raise ConfigError(f"{where}: '{key}' is set by the sweep itself; sweep another option")
    if key not in leaf_names(pretrain.Config):
        raise ConfigError(f"{where}: '{key}' is not a pretrain option; see lmforge pretrain --help")
    if len(set(items)) != len(items):
        raise ConfigError(f"{where}: '{text}' repeats a value")
    return key, items


def base_args(text: str) -> list[str]:
    """The base as pretrain command-line arguments: 'a.b=1 --c 2' -> ['--a.b', '1', '--c', '2']."""
    try:
        tokens = shlex.split(text)
    except ValueError as e:
        raise ConfigError(f"base: cannot split '{text}' ({e})") from None
    args: list[str] = []
    for tok in tokens:
        if not tok.startswith("--") and "=" in tok:
            key, _, value = tok.partition("=")
            args += [f"--{key}", value]
        else:
            args.append(tok)
    for arg in args:
        if arg.startswith("--") and arg[2:].partition("=")[0] in RESERVED:
            raise ConfigError(f"base: {arg} is set by the sweep itself; remove it")
    return args


def _field(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def build_points(cfg: Config) -> list[Point]:
    """Every grid point's pretrain config, built and validated before anything runs."""
    grids = [parse_grid(cfg.grid, "grid")]
    if cfg.grid2:
        grids.append(parse_grid(cfg.grid2, "grid2"))
        if grids[1][0] == grids[0][0]:
            raise ConfigError("grid2: sweeps the same option as grid; choose another one")
    common = base_args(cfg.base)
    points = []
    for i, combo in enumerate(itertools.product(*(values for _, values in grids))):
        args = list(common)
        for (key, _), value in zip(grids, combo):
            args += [f"--{key}", value]
        args += ["--run", f"{cfg.name}-{i}", "--runs_dir", cfg.runs_dir]
        try:
            run_cfg = build(pretrain.Config, args, resolve=pretrain.resolve)
        except ConfigError as e:
            raise ConfigError(f"sweep point {i} ({', '.join(combo)}): {e}") from None
        # End-of-run samples are noise in a sweep; overwrite is the sweep's decision.
        run_cfg = dataclasses.replace(run_cfg, samples=[], overwrite=cfg.overwrite)
        settings = {key: _field(run_cfg, key) for key, _ in grids}
        points.append(Point(i, settings, run_cfg))
    return points


def _check_fresh(cfg: Config, points: list[Point]) -> Path:
    """Refuse to clobber earlier runs or results unless --overwrite; return the results dir."""
    out = Path(cfg.runs_dir) / cfg.name
    if (out / "config.yaml").is_file():
        raise UserError(f"{out} is a pretrain run, not a sweep; choose another --name")
    if cfg.overwrite:
        shutil.rmtree(out, ignore_errors=True)
        return out
    taken = [p.cfg.run for p in points if (Path(cfg.runs_dir) / p.cfg.run).exists()]
    if out.exists() or taken:
        what = f"runs {', '.join(taken)}" if taken else f"results in {out}"
        raise UserError(f"sweep '{cfg.name}' already has {what}; pass --overwrite to start "
                        "over or choose another --name")
    return out


# --------------------------------------------------------------------------- running


def _diverged(error: UserError) -> bool:
    # The loop reports a non-finite loss as a UserError with this wording; a dedicated
    # exception type in train/loop.py would let us catch it by type instead.
    return str(error).startswith("training diverged")


def run_point(point: Point) -> dict[str, Any]:
    """Train one grid point through the pretrain recipe; its result row."""
    row: dict[str, Any] = {"index": point.index, "run": point.cfg.run,
                           "settings": point.settings}
    try:
        pretrain_main.main(point.cfg)
    except UserError as e:
        if not _diverged(e):
            raise
        return {**row, "val_loss": None, "error": str(e)}
    summary_path = Path(point.cfg.runs_dir) / point.cfg.run / "summary.json"
    summary = json.loads(summary_path.read_text(encoding="utf-8"))
    keep = ("val_loss", "val_ppl", "val_bpb", "tokens", "tokens_per_s", "seconds")
    return {**row, **{k: summary.get(k) for k in keep}, "error": None}


def main(cfg: Config) -> int:
    """Build every point, run them in order, save the table and the plot after each."""
    console = Console()
    points = build_points(cfg)
    out = _check_fresh(cfg, points)
    rows: list[dict[str, Any]] = []
    for point in points:
        shown = ", ".join(f"{k}={v}" for k, v in point.settings.items())
        console.rule(f"sweep {cfg.name}: run {point.index + 1}/{len(points)} ({shown})")
        rows.append(run_point(point))
        _save(cfg, out, rows)
    console.print(results_table(cfg, rows))
    console.print(f"saved {out}/sweep.json and sweep.png")
    return 0


def _save(cfg: Config, out: Path, rows: list[dict[str, Any]]) -> None:
    done = [r for r in rows if r["val_loss"] is not None]
    best = min(done, key=lambda r: r["val_loss"]) if done else None
    atomic_write_json(out / "sweep.json", {
        "name": cfg.name, "grid": cfg.grid, "grid2": cfg.grid2, "base": cfg.base,
        "runs": rows, "best": best})
    plot_sweep(rows, out / "sweep.png", title=f"sweep {cfg.name}: final val loss")


# --------------------------------------------------------------------------- reporting


def results_table(cfg: Config, rows: list[dict[str, Any]]) -> Table:
    """Final val loss per setting; the best row in bold."""
    keys = list(rows[0]["settings"]) if rows else []
    done = [r["val_loss"] for r in rows if r["val_loss"] is not None]
    best = min(done) if done else None
    t = Table(title=f"sweep {cfg.name}", title_justify="left")
    for col in ("run", *keys):
        t.add_column(col)
    for col in ("val loss", "perplexity", "tokens/s", "time"):
        t.add_column(col, justify="right")
    for r in rows:
        cells = [r["run"], *(str(r["settings"][k]) for k in keys)]
        if r["val_loss"] is None:  # diverged, or an objective whose summary has no val loss
            cells += ["diverged" if r["error"] else "n/a", "", "", ""]
        else:
            cells += [f"{r['val_loss']:.4f}", f"{r['val_ppl']:.2f}",
                      f"{r['tokens_per_s']:.0f}", f"{r['seconds']:.0f} s"]
        style = "bold" if best is not None and r["val_loss"] == best else None
        t.add_row(*cells, style=style)
    return t

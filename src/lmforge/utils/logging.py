"""Run logging: metrics.jsonl, a rich progress bar, and one-line messages.

One small interface (``RunLogger``) so the training loop never knows where numbers go.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from lmforge.utils.trackers import Tracker


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e5):
            return f"{v:.3e}"
        return f"{v:.4f}" if abs(v) < 10 else f"{v:.1f}"
    return str(v)


class RunLogger:
    """Appends metrics to ``metrics.jsonl`` (one JSON object per line) and shows progress.

    Use as a context manager around the loop. ``log`` writes a record; ``progress`` refreshes
    the bar's loss / lr / tokens-per-second text; ``info`` prints a line above the bar.
    """

    def __init__(self, path: Path | None, total_steps: int, console: Console,
                 start_step: int = 0, enabled: bool = True,
                 trackers: Sequence[Tracker] = ()) -> None:
        self.path = path if enabled else None
        self.trackers = list(trackers) if enabled else []
        self.enabled = enabled  # False on ranks other than 0: they compute, rank 0 reports
        self.console = console
        self._progress = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            TextColumn("{task.fields[status]}"),
            console=console,
            transient=False,
        )
        self._task = self._progress.add_task("train", total=total_steps, completed=start_step,
                                             status="")
        self._file = None
        self.t0 = time.time()

    def __enter__(self) -> RunLogger:
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a", encoding="utf-8")
        if self.enabled:
            self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()
        if self._file is not None:
            self._file.close()
        for tracker in self.trackers:
            tracker.close()

    def log(self, record: dict[str, Any]) -> None:
        """Append one record (with wall time) to metrics.jsonl."""
        rec = {**record, "time": round(time.time() - self.t0, 3)}
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                 for k, v in rec.items()}
        if self._file is not None:
            self._file.write(json.dumps(clean) + "\n")
            self._file.flush()
        for tracker in self.trackers:
            tracker.log(clean)

    def progress(self, step: int, **fields: Any) -> None:
        """Move the bar to ``step`` and show ``fields`` beside it."""
        status = "  ".join(f"{k} {_fmt(v)}" for k, v in fields.items())
        self._progress.update(self._task, completed=step, status=status)

    def info(self, message: str) -> None:
        """Print one line above the progress bar."""
        if self.enabled:
            self._progress.console.print(message)


def truncate_metrics(path: Path, step: int) -> None:
    """Drop the records logged after ``step`` (a resumed run logs those steps again).

    Records without a step, and a torn last line, are dropped too only if they come after
    the first record past ``step``; the file is rewritten atomically.
    """
    from lmforge.utils.io import atomic_write_text

    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            break
        if isinstance(record, dict) and isinstance(record.get("step"), int) \
                and record["step"] > step:
            break
        kept.append(line)
    atomic_write_text(path, "".join(x + "\n" for x in kept))


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Read metrics.jsonl; a torn last line (killed mid-write) is ignored."""
    out = []
    if not path.exists():
        return out
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out

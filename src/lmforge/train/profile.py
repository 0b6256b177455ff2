"""Profiling a few optimizer steps with torch.profiler (``--train.profile``, every mode)."""

from __future__ import annotations

from pathlib import Path

import torch
from rich.console import Console

from lmforge.utils.io import atomic_write_text


def profiler(run_dir: Path) -> torch.profiler.profile:
    """Skip 1 step, warm up 1, record 3: steps 3-5 (the first steps pay one-off costs)."""
    from torch.profiler import ProfilerActivity, profile, schedule, tensorboard_trace_handler

    activities = [ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(ProfilerActivity.CUDA)
    write_trace = tensorboard_trace_handler(str(run_dir / "profile"))

    def on_ready(prof: torch.profiler.profile) -> None:
        # the recorded events are only available here, before the profiler moves on
        write_trace(prof)
        sort = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
        table = prof.key_averages().table(sort_by=sort, row_limit=15)
        atomic_write_text(run_dir / "profile" / "top_ops.txt", table + "\n")

    return profile(activities=activities, schedule=schedule(wait=1, warmup=1, active=3),
                   on_trace_ready=on_ready)


def profile_report(run_dir: Path, console: Console) -> None:
    """Print the operators that took the most time in the profiled steps."""
    top = run_dir / "profile" / "top_ops.txt"
    if not top.is_file():
        console.print("profile: the run had fewer than 5 steps, nothing was recorded")
        return
    console.print(top.read_text(), markup=False, highlight=False)
    console.print(f"profile trace: {run_dir / 'profile'} (tensorboard --logdir, or ui.perfetto.dev)")

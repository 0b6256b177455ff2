"""Out-of-memory help names the breakdown and only suggests settings that fit."""

from __future__ import annotations

from lmforge.models.registry import preset
from lmforge.plan import TrainSettings, train_memory
from lmforge.train.oom import GIB, oom_report


def test_report_breaks_memory_down_and_suggests_fitting_settings():
    cfg = preset("gpt2-124m")
    s = TrainSettings(batch_size=64, seq_len=1024, precision="bf16")
    need = train_memory(cfg, s)["peak"]
    device = need * 0.6  # a device with 60% of what the run needs
    lines = oom_report(cfg, s, device)
    text = "\n".join(lines)
    for part in ("weights", "gradients", "optimizer states", "activations"):
        assert part in text
    assert "settings that would fit" in text
    suggestion = next(line for line in lines if "--train.batch_size" in line)
    batch = int(suggestion.split("--train.batch_size ")[1].split()[0])
    accum = int(suggestion.split("--train.grad_accum ")[1].split()[0])
    assert batch * accum == 64
    smaller = TrainSettings(batch_size=batch, grad_accum=accum, seq_len=1024, precision="bf16")
    assert train_memory(cfg, smaller)["peak"] <= 0.9 * device


def test_nothing_fits_on_a_tiny_device():
    lines = oom_report(preset("gpt2-124m"), TrainSettings(batch_size=8), 0.01 * GIB)
    assert "no single setting change fits" in lines[-1]

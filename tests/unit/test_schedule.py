"""Learning-rate schedule values at its boundaries."""

from __future__ import annotations

import itertools
import math

import pytest

from lmforge.config import ConfigError, OptimConfig, TrainConfig
from lmforge.train.schedule import lr_at, resolve_steps, resolved


def test_warmup_is_linear_and_reaches_peak():
    assert lr_at(0, 1.0, 10, 100, 0.1) == pytest.approx(0.1)
    assert lr_at(4, 1.0, 10, 100, 0.1) == pytest.approx(0.5)
    assert lr_at(9, 1.0, 10, 100, 0.1) == pytest.approx(1.0)
    assert lr_at(10, 1.0, 10, 100, 0.1) == pytest.approx(1.0)  # cosine starts at the peak


def test_cosine_midpoint_and_floor():
    # halfway through the decay the cosine is at the mean of peak and floor
    assert lr_at(55, 1.0, 10, 100, 0.1) == pytest.approx(0.55)
    assert lr_at(100, 1.0, 10, 100, 0.1) == pytest.approx(0.1)
    assert lr_at(10_000, 1.0, 10, 100, 0.1) == pytest.approx(0.1)


def test_monotone_after_warmup_and_no_warmup_case():
    values = [lr_at(s, 3e-3, 0, 50, 0.0) for s in range(51)]
    assert values[0] == pytest.approx(3e-3)
    assert all(a >= b for a, b in itertools.pairwise(values))
    assert values[-1] == 0.0
    assert not any(math.isnan(v) for v in values)


def _steps(spe: float, **kw: float | None) -> tuple[int, int]:
    train = {k: v for k, v in kw.items() if k in ("max_steps", "epochs")}
    optim = {k: v for k, v in kw.items() if k in ("warmup_steps", "warmup_ratio")}
    return resolve_steps(TrainConfig(**train), OptimConfig(**optim), spe)  # type: ignore[arg-type]


def test_without_epochs_or_ratio_the_given_counts_stand():
    assert _steps(123.4) == (1200, 100)
    assert _steps(0.0, max_steps=7, warmup_steps=3) == (7, 3)


@pytest.mark.parametrize(("spe", "epochs", "want"), [
    (95.0, 1.0, 95), (95.0, 0.5, 48), (10.0, 0.7, 7), (2.5, 3.0, 8), (0.3, 1.0, 1),
    (1000 / 96, 2.0, 21),
])
def test_epochs_round_up_to_whole_steps(spe: float, epochs: float, want: int):
    assert _steps(spe, epochs=epochs)[0] == want


def test_warmup_ratio_is_a_share_of_the_resolved_length_rounded_up():
    assert _steps(95.0, epochs=1.0, warmup_ratio=0.1) == (95, 10)
    assert _steps(0.0, max_steps=100, warmup_ratio=0.1) == (100, 10)
    assert _steps(0.0, max_steps=3, warmup_ratio=0.1) == (3, 1)
    assert _steps(0.0, max_steps=50, warmup_ratio=0.0) == (50, 0)


def test_epochs_over_an_empty_split_is_a_config_error():
    with pytest.raises(ConfigError, match="train.epochs"):
        _steps(0.0, epochs=1.0)


def test_resolved_copies_clear_the_alternatives():
    train, optim = resolved(TrainConfig(epochs=2.0, batch_size=4), OptimConfig(warmup_ratio=0.25),
                            10.0)
    assert (train.max_steps, train.epochs, train.batch_size) == (20, None, 4)
    assert (optim.warmup_steps, optim.warmup_ratio) == (5, None)

"""Learning-rate schedule values at its boundaries."""

from __future__ import annotations

import itertools
import math

import pytest

from lmforge.train.schedule import lr_at


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

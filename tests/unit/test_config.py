"""The config machinery: docs from field docstrings, YAML + dotted overrides, strict errors."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import pytest

from lmforge.config import (
    ALLOW_NONFINITE,
    ConfigError,
    OptimConfig,
    TrainConfig,
    build,
    field_docs,
    from_dict,
    iter_fields,
    load_yaml,
    save_yaml,
)


@dataclass
class Inner:
    width: int = 32
    """Model width."""
    norm: Literal["layernorm", "rmsnorm"] = "rmsnorm"
    """Which normalization."""
    kv: int | None = None
    """Key/value heads."""


@dataclass
class Outer:
    name: str = "x"
    """Run name."""
    lr: float = 1e-3
    """Learning rate."""
    compile: bool = False
    """Use torch.compile."""
    inputs: list[str] = field(default_factory=list)
    """Input files."""
    inner: Inner = field(default_factory=Inner)
    """A section."""


def test_field_docs_come_from_docstrings_under_fields():
    assert field_docs(Outer)["lr"] == "Learning rate."
    assert field_docs(Inner)["norm"] == "Which normalization."
    assert "warmup" in field_docs(OptimConfig)["warmup_steps"].lower()


def test_defaults_yaml_and_overrides_layer_in_order(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("lr: 0.01\ninner:\n  width: 64\n  kv: 2\n")
    cfg = build(Outer, ["--config", str(y), "--inner.width", "128", "--compile", "--inputs", "a,b"])
    assert cfg.lr == 0.01 and cfg.inner.width == 128 and cfg.inner.kv == 2
    assert cfg.compile is True and cfg.inputs == ["a", "b"] and cfg.inner.norm == "rmsnorm"


def test_yaml_round_trip_reproduces_config(tmp_path):
    cfg = build(Outer, ["--inner.norm", "layernorm", "--lr=3e-4", "--inner.kv", "null"])
    p = tmp_path / "saved.yaml"
    p.write_text(save_yaml(cfg))
    assert from_dict(Outer, load_yaml(p)) == cfg


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--inner.widht", "3"], "did you mean 'inner.width'"),
        (["--lr", "fast"], "--lr: must be a number"),
        (["--inner.norm", "batchnorm"], "must be one of layernorm, rmsnorm"),
        (["--inner.width", "3.5"], "must be an integer"),
        (["--compile", "maybe"], "must be true or false"),
        (["--lr"], "missing value"),
        (["stray"], "unexpected argument"),
    ],
)
def test_bad_values_are_one_line_errors_naming_the_field(argv, message):
    with pytest.raises(ConfigError, match=message) as info:
        build(Outer, argv)
    assert "\n" not in str(info.value)


def test_negative_numbers_are_values_not_options():
    assert build(Outer, ["--lr", "-1e-3"]).lr == -1e-3


def test_yaml_errors_name_the_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("lr: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml line"):
        build(Outer, ["--config", str(bad)])
    with pytest.raises(ConfigError, match="not found"):
        build(Outer, ["--config", str(tmp_path / "missing.yaml")])
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("inner:\n  depth: 3\n")
    with pytest.raises(ConfigError, match="unknown option 'inner.depth'"):
        build(Outer, ["--config", str(unknown)])


def test_shared_sections_validate_their_values():
    with pytest.raises(ConfigError, match="optim.lr"):
        OptimConfig(lr=0)
    with pytest.raises(ConfigError, match="train.batch_size"):
        TrainConfig(batch_size=0)


@dataclass
class Recipe:
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=2e-4, warmup_steps=10,
                                                                   weight_decay=0.0))
    """A section whose default differs from the section class's defaults."""
    inner: Inner | None = None
    """An optional section with no default instance."""


def test_a_partial_section_keeps_the_fields_own_defaults():
    # --optim.lr alone must not reset warmup/weight decay to OptimConfig's class defaults
    cfg = build(Recipe, ["--optim.lr", "1e-3"])
    assert (cfg.optim.lr, cfg.optim.warmup_steps, cfg.optim.weight_decay) == (1e-3, 10, 0.0)
    assert build(Recipe, []).optim == OptimConfig(lr=2e-4, warmup_steps=10, weight_decay=0.0)
    assert build(Recipe, ["--inner.width", "8"]).inner == Inner(width=8)


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "NaN", "1e999"])
def test_non_finite_floats_are_refused_naming_the_field(value: str, tmp_path):
    with pytest.raises(ConfigError, match="--optim.lr: must be a finite number"):
        build(Recipe, ["--optim.lr", value])
    y = tmp_path / "c.yaml"
    y.write_text("optim:\n  grad_clip: .nan\n")
    with pytest.raises(ConfigError, match="optim.grad_clip: must be a finite number"):
        build(Recipe, ["--config", str(y)])


@dataclass
class Bounds:
    limit: float = field(default=float("inf"), metadata={ALLOW_NONFINITE: True})
    """A float that may be infinite, on purpose."""


def test_a_field_may_allow_non_finite_floats():
    assert build(Bounds, ["--limit", "-inf"]).limit == float("-inf")
    assert from_dict(Bounds, {"limit": float("inf")}).limit == float("inf")


def test_help_defaults_are_the_sections_own_defaults():
    shown = {name: default for name, _, default, _ in iter_fields(Recipe)}
    assert (shown["optim.lr"], shown["optim.warmup_steps"], shown["optim.weight_decay"]) == (
        2e-4, 10, 0.0)
    assert shown["inner.width"] == 32  # no default instance: the class's own


@dataclass
class Run:
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer."""
    train: TrainConfig = field(default_factory=lambda: TrainConfig(max_steps=100))
    """Loop."""


@pytest.mark.parametrize("argv", [
    ["--train.epochs", "2", "--train.max_steps", "10"],
    ["--optim.warmup_ratio", "0.1", "--optim.warmup_steps", "5"],
])
def test_both_options_of_a_pair_in_one_place_is_one_error(argv: list[str], tmp_path):
    with pytest.raises(ConfigError, match="are both set; give one of them") as info:
        build(Run, argv)
    assert "\n" not in str(info.value)
    y = tmp_path / "both.yaml"
    y.write_text("train:\n  epochs: 1\n  max_steps: 3\n")
    with pytest.raises(ConfigError, match="train.max_steps and train.epochs"):
        build(Run, ["--config", str(y)])


def test_a_later_layer_replaces_the_other_option_of_a_pair(tmp_path):
    saved = tmp_path / "saved.yaml"  # as a run saves it: resolved max_steps, epochs null
    saved.write_text(save_yaml(Run()))
    assert build(Run, ["--config", str(saved), "--train.epochs", "2"]).train.epochs == 2
    epochs = tmp_path / "epochs.yaml"
    epochs.write_text("train:\n  epochs: 2\n")
    cfg = build(Run, ["--config", str(epochs), "--train.max_steps", "7"])
    assert (cfg.train.epochs, cfg.train.max_steps) == (None, 7)
    cfg = build(Run, ["--train.epochs", "0.5"])
    assert (cfg.train.epochs, cfg.train.max_steps) == (0.5, 100)  # max_steps unused, not lost
    with pytest.raises(ConfigError, match="train.epochs must be > 0"):
        build(Run, ["--train.epochs", "0"])
    with pytest.raises(ConfigError, match=r"warmup_ratio must be in \[0, 1\)"):
        build(Run, ["--optim.warmup_ratio", "1"])

"""The config machinery: docs from field docstrings, YAML + dotted overrides, strict errors."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import pytest

from lmforge.config import (
    ConfigError,
    OptimConfig,
    TrainConfig,
    build,
    field_docs,
    from_dict,
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

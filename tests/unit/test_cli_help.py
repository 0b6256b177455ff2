"""`lmforge <command> --help`: the defaults it shows are the ones a config really has."""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from lmforge.cli import COMMANDS, command_help, format_default
from lmforge.config import ConfigError, iter_fields

OPTION = re.compile(r"^  --(\S+) \((.*), default: (.*)\)$")


def _shown(text: str) -> dict[str, str]:
    """option -> default as printed, for every option line of a help text."""
    return {m[1]: m[3] for m in map(OPTION.match, text.splitlines()) if m}


def _value(cfg: object, dotted: str) -> object:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_help_shows_the_default_a_config_built_with_no_options_has(name: str):
    module = importlib.import_module(COMMANDS[name])
    shown = _shown(command_help(name, module))
    assert set(shown) == {opt for opt, *_ in iter_fields(module.Config)}
    try:
        cfg = module.Config()
    except (TypeError, ConfigError):  # a required option (a path, a name): nothing to compare
        pytest.skip(f"{name}: its config has a required option")
    notes = set(getattr(module, "DEFAULTS_NOTE", {}).values())
    for opt, text in shown.items():
        if text in notes:  # "from --preset": filled at build time, not a fixed default
            continue
        assert text == format_default(_value(cfg, opt)), opt


def test_finetune_help_shows_its_own_training_defaults():
    module = importlib.import_module(COMMANDS["finetune"])
    shown = _shown(command_help("finetune", module))
    assert shown["optim.lr"] == "0.0002" and shown["optim.warmup_steps"] == "10"
    assert shown["train.max_steps"] == "100" and shown["train.batch_size"] == "8"
    assert shown["train.trackers"] == "[]" and shown["optim.weight_decay"] == "0.0"


def test_help_lines_stay_single_lines():
    module = importlib.import_module(COMMANDS["pretrain"])
    assert _shown(command_help("pretrain", module))["samples"] == "'ROMEO.\\n',To be, or not to be"


@pytest.mark.parametrize("args", ["pretrain --help", "finetune --help", "--help",
                                  "data prepare --help"])
def test_help_into_a_closed_pipe_ends_quietly(args: str, tmp_path: Path):
    # `head -1` exits after one line; the rest of the help meets a closed pipe.
    script = (f"{sys.executable} -m lmforge.cli {args} 2>{tmp_path / 'err'} | head -1; "
              "echo ${PIPESTATUS[0]}")
    proc = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "COLUMNS": "120"})
    first, status = proc.stdout.splitlines()
    assert first.startswith("usage: lmforge")
    assert int(status) in (0, 141)
    assert (tmp_path / "err").read_text() == ""

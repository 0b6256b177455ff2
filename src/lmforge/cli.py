"""The ``lmforge`` command: one table from command name to recipe.

Each recipe module defines a ``Config`` dataclass (its options, with a docstring per field) and
``main(cfg)``. Options come from the dataclass: ``--help`` is generated from it, ``--config
file.yaml`` sets any field and dotted overrides (``--model.n_layer 4``) win. A recipe may also
name ``POSITIONAL`` fields (given before any option) and a ``resolve(data)`` hook that fills
defaults from a preset before validation.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import os
import sys
from types import ModuleType
from typing import Any

COMMANDS: dict[str, str] = {
    "data prepare": "lmforge.recipes.data_prepare",
    "data synth": "lmforge.recipes.data_synth",
    "data check": "lmforge.recipes.data_check",
    "data merge": "lmforge.recipes.data_merge",
    "pretrain": "lmforge.recipes.pretrain",
    "finetune": "lmforge.recipes.finetune",
    "merge": "lmforge.recipes.merge",
    "eval": "lmforge.recipes.eval",
    "generate": "lmforge.recipes.generate",
    "chat": "lmforge.recipes.chat",
    "serve": "lmforge.recipes.serve",
    "runs": "lmforge.recipes.runs",
    "import": "lmforge.recipes.hf_import",
    "export": "lmforge.recipes.export",
    "push": "lmforge.recipes.push",
    "env": "lmforge.recipes.env",
    "plan": "lmforge.recipes.plan",
    "sweep": "lmforge.recipes.sweep",
}


def _summary(module_path: str) -> str:
    """First docstring line of a recipe, read without importing it (so no torch import)."""
    import ast
    import importlib.util

    spec = importlib.util.find_spec(module_path)
    assert spec is not None and spec.origin is not None
    with open(spec.origin, encoding="utf-8") as f:
        doc = ast.get_docstring(ast.parse(f.read())) or ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


def _usage() -> str:
    lines = [
        "usage: lmforge <command> [options]     (lmforge <command> --help for its options)",
        "",
        "lmforge: data -> tokenizer -> pretrain -> generate, for transformer language models.",
        "",
        "commands:",
    ]
    width = max(len(c) for c in COMMANDS)
    for name, path in COMMANDS.items():
        lines.append(f"  {name:<{width}}  {_summary(path)}")
    return "\n".join(lines)


def format_default(value: Any) -> str:
    """A default as ``--help`` shows it: as typed on the command line, on one line."""
    if value is dataclasses.MISSING:
        return "required"
    if isinstance(value, (list, tuple)):
        return ",".join(map(_one_line, value)) if value else "[]"
    if value is None:
        return "null"
    return _one_line(value)


def _one_line(value: Any) -> str:
    # A default holding a newline ("ROMEO.\n") would otherwise break the help line in two.
    text = str(value)
    return text if text.isprintable() else repr(text)


def command_help(name: str, module: ModuleType) -> str:
    """``--help`` text for one command, generated from its Config dataclass."""
    from lmforge.config import iter_fields, type_name

    doc = (module.__doc__ or "").strip()
    positional = getattr(module, "POSITIONAL", ())
    usage = f"usage: lmforge {name}" + "".join(f" [{p.upper()}...]" for p in positional)
    lines = [usage + " [--config FILE.yaml] [--option value ...]", "", doc, "", "options:"]
    lines.append("  --config FILE.yaml   set any option from a YAML file (options below win)")
    note = getattr(module, "DEFAULTS_NOTE", {})
    for opt, tp, default, help_text in iter_fields(module.Config):
        section = opt.split(".")[0] if "." in opt else ""
        shown = note.get(section) or format_default(default)
        lines.append(f"  --{opt} ({type_name(tp)}, default: {shown})")
        if help_text:
            lines.append(f"      {help_text}")
    examples = getattr(module, "EXAMPLES", "")
    if examples:
        lines += ["", "examples:", *("  " + e for e in examples.strip().splitlines())]
    return "\n".join(lines)


def _split_command(argv: list[str]) -> tuple[str | None, list[str]]:
    for n in (2, 1):
        name = " ".join(argv[:n])
        if name in COMMANDS:
            return name, argv[n:]
    return None, argv


def run(argv: list[str]) -> int:
    """Parse ``argv`` (without the program name), run the command, return its exit code."""
    from lmforge.config import ConfigError, build, set_dotted

    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from lmforge import __version__

        print(f"lmforge {__version__}")
        return 0
    name, rest = _split_command(argv)
    if name is None:
        raise ConfigError(f"unknown command '{' '.join(argv[:2])}'; run `lmforge --help` for the list")
    module = importlib.import_module(COMMANDS[name])
    if "-h" in rest or "--help" in rest:
        print(command_help(name, module))
        return 0
    positional = getattr(module, "POSITIONAL", ())
    pos_values: list[str] = []
    while rest and not rest[0].startswith("--"):
        pos_values.append(rest.pop(0))
    if pos_values and not positional:
        raise ConfigError(f"unexpected argument '{pos_values[0]}'; see `lmforge {name} --help`")
    pre: dict[str, Any] = {}
    if pos_values:
        field = positional[0]
        set_dotted(pre, field, pos_values if len(positional) == 1 and _is_list(module, field)
                   else pos_values[0])
        if len(pos_values) > 1 and not _is_list(module, field):
            raise ConfigError(f"unexpected argument '{pos_values[1]}'; see `lmforge {name} --help`")
    resolve = getattr(module, "resolve", None)
    cfg = build(module.Config, rest, base=pre, resolve=resolve)
    result = module.main(cfg)
    return int(result or 0)


def _is_list(module: ModuleType, field: str) -> bool:
    from lmforge.config import iter_fields

    for name, tp, *_ in iter_fields(module.Config):
        if name == field:
            return "list" in str(tp)
    return False


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: user mistakes are one line on stderr and exit code 2."""
    from lmforge.config import UserError

    # torchao (imported by transformers and by --quant) logs each CUDA library it cannot load on
    # a CPU-only torch, and torch warns about an Enum it registers: noise on every export.
    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        code = run(sys.argv[1:] if argv is None else argv)
        sys.stdout.flush()  # a closed pipe shows up here, inside the try, not at exit
    except BrokenPipeError:
        _quiet_broken_pipe()
    except UserError as e:
        print(f"lmforge: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("lmforge: interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code)


def _quiet_broken_pipe() -> None:
    """End like other Unix tools when the reader went away (``lmforge ... --help | head -1``):
    no traceback, exit 141 (128 + SIGPIPE)."""
    # Python flushes stdout once more at exit; point it at devnull so that flush cannot fail.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    sys.exit(141)


if __name__ == "__main__":
    main()

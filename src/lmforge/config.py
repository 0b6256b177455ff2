"""Typed configuration: dataclasses in, validated dataclasses out.

Every command's options are a tree of dataclasses whose fields carry a docstring (the string
literal right under the field). From that one definition we derive:

- ``--help`` text (``field_docs``), so a default or a description is written exactly once;
- YAML loading (``load_yaml``) and dotted command-line overrides (``--model.n_layer 4``);
- strict type checking with one-line errors that name the field and what was expected.

This module is the bottom layer: it imports nothing from lmforge and not torch.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import inspect
import math
import textwrap
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar, Union, get_args, get_origin

import yaml


class UserError(Exception):
    """A mistake in what the user gave us (a value, a file, a path).

    The CLI prints it as one line and exits with code 2; no traceback. The message must name
    the field, file or line at fault and say how to fix it.
    """


class ConfigError(UserError):
    """An invalid configuration value or an unknown key."""


T = TypeVar("T")

ALLOW_NONFINITE = "allow_nonfinite"
"""Field metadata key: ``field(default=..., metadata={ALLOW_NONFINITE: True})`` lets a float
option take nan/inf; every other float option refuses them (a nan lr only fails deep in torch)."""


# --------------------------------------------------------------------------- field docs


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """Map each field of dataclass ``cls`` (and its bases) to the docstring written under it."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            source = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):  # no source (e.g. built in a REPL): no docs, not an error
            continue
        body = ast.parse(source).body[0]
        assert isinstance(body, ast.ClassDef)
        for node, nxt in zip(body.body, body.body[1:]):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


# --------------------------------------------------------------------------- typing helpers


def _resolved_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_optional(tp: Any) -> tuple[bool, Any]:
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) < len(get_args(tp)) and len(args) == 1:
            return True, args[0]
    return False, tp


def type_name(tp: Any) -> str:
    """A short human name for a field type, for help and error text."""
    optional, inner = _is_optional(tp)
    if optional:
        return f"{type_name(inner)} or null"
    origin = get_origin(inner)
    if origin is Literal:
        return "one of " + "|".join(str(a) for a in get_args(inner))
    if origin in (list, tuple):
        args = get_args(inner)
        return f"list of {type_name(args[0])}" if args else "list"
    if dataclasses.is_dataclass(inner):
        return "section"
    return getattr(inner, "__name__", str(inner))


_TRUE = {"true", "yes", "1", "on"}
_FALSE = {"false", "no", "0", "off"}


def coerce(value: Any, tp: Any, where: str, finite: bool = True) -> Any:
    """Convert ``value`` (from YAML or a command-line string) to type ``tp`` or raise ConfigError.

    Floats must be finite unless ``finite`` is false (see ``ALLOW_NONFINITE``).
    """
    optional, inner = _is_optional(tp)
    if value is None or (optional and isinstance(value, str) and value.lower() in {"null", "none"}):
        if optional:
            return None
        raise ConfigError(f"{where}: must be {type_name(tp)}, got null")
    origin = get_origin(inner)
    if origin is Literal:
        choices = get_args(inner)
        for choice in choices:
            if value == choice or (isinstance(value, str) and str(choice) == value):
                return choice
        raise ConfigError(f"{where}: must be one of {', '.join(map(str, choices))}; got {value!r}")
    if origin in (list, tuple):
        (elem,) = get_args(inner)[:1] or (str,)
        if isinstance(value, str):
            value = [v for v in (p.strip() for p in value.split(",")) if v]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: must be a list, got {value!r}")
        items = [coerce(v, elem, f"{where}[{i}]", finite) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if inner is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
            return value.lower() in _TRUE
        raise ConfigError(f"{where}: must be true or false, got {value!r}")
    if inner is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: must be an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(float(value)) if _is_integral_str(value) else int(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: must be an integer, got {value!r}")
    if inner is float:
        number = _float(value)
        if number is None:
            raise ConfigError(f"{where}: must be a number, got {value!r}")
        if finite and not math.isfinite(number):
            raise ConfigError(f"{where}: must be a finite number, got {value!r}")
        return number
    if inner is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where}: must be a string, got {value!r}")
    raise ConfigError(f"{where}: unsupported value {value!r}")


def _float(value: Any) -> float | None:
    """``value`` as a float (a number or a numeric string), else None."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def _is_integral_str(s: str) -> bool:
    """'1e6' and '2048.0' are accepted as integers when they are whole numbers."""
    try:
        f = float(s)
    except ValueError:
        return False
    return f.is_integer() and not s.strip().lstrip("-").isdigit()


# --------------------------------------------------------------------------- building


def _unknown_key(key: str, known: list[str], where: str) -> ConfigError:
    near = difflib.get_close_matches(key, known, n=1)
    hint = f" (did you mean '{near[0]}'?)" if near else ""
    prefix = f"{where}." if where else ""
    return ConfigError(
        f"unknown option '{prefix}{key}'{hint}; see --help for the valid options"
    )


def from_dict(cls: type[T], data: dict[str, Any], where: str = "") -> T:
    """Build dataclass ``cls`` from a nested dict, checking every key and type."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: must be a mapping of options, got {data!r}")
    hints = _resolved_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key not in fields:
            raise _unknown_key(key, list(fields), where)
        path = f"{where}.{key}" if where else key
        tp = hints[key]
        _, inner = _is_optional(tp)
        if dataclasses.is_dataclass(inner):
            # A partial section ({"lr": 1e-3}) keeps the rest of the field's own default (a
            # recipe's OptimConfig(lr=2e-4, warmup_steps=10)), not the section class's defaults.
            base = _section_default(fields[key], inner)  # type: ignore[arg-type]
            if isinstance(value, dict) and base:
                # the user's layers were checked by build; the default is one more layer
                value = overlay(inner, base, value, path, strict=False)  # type: ignore[arg-type]
            kwargs[key] = from_dict(inner, value, path)  # type: ignore[arg-type]
        else:
            kwargs[key] = coerce(value, tp, path, finite=_finite(fields[key]))
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:  # a __post_init__ check written with ValueError
        raise ConfigError(f"{where or 'config'}: {e}") from None


def _finite(f: dataclasses.Field) -> bool:
    """Whether a float field refuses nan/inf (all do, unless marked ``ALLOW_NONFINITE``)."""
    return not f.metadata.get(ALLOW_NONFINITE, False)


def overlay(cls: type, lower: dict[str, Any], upper: dict[str, Any], where: str = "",
            strict: bool = True) -> dict[str, Any]:
    """``merge(lower, upper)`` for a config of ``cls``, minding each section's ALTERNATIVES.

    A section may name pairs of options that say one thing two ways (``train.epochs`` instead of
    ``train.max_steps``). Giving both in one layer (one YAML file, one command line) is an error;
    giving one in a later layer sets the other's alternative back to null, so the later layer
    wins as it does for any other option. ``strict=False`` skips the both-set check, for an
    ``upper`` that already merges several layers.
    """
    if not dataclasses.is_dataclass(cls) or not isinstance(upper, dict):
        return merge(lower, upper) if isinstance(upper, dict) else upper
    out = dict(lower)
    prefix = f"{where}." if where else ""
    for alt, replaced in getattr(cls, "ALTERNATIVES", {}).items():
        if strict and upper.get(alt) is not None and upper.get(replaced) is not None:
            raise ConfigError(f"{prefix}{replaced} and {prefix}{alt} are both set; give one of "
                              f"them ({alt} replaces {replaced})")
        if replaced in upper and alt not in upper:
            out[alt] = None
    hints = _resolved_hints(cls)
    for key, value in upper.items():
        _, inner = _is_optional(hints.get(key))
        if isinstance(value, dict):
            below = out.get(key) if isinstance(out.get(key), dict) else {}
            out[key] = overlay(inner, below, value, prefix + key, strict)
        else:
            out[key] = value
    return out


def _section_default(f: dataclasses.Field, cls: type) -> dict[str, Any]:
    """The init fields of a nested section's default instance, as a dict ({} when none)."""
    if f.default_factory is not dataclasses.MISSING:
        default = f.default_factory()
    else:
        default = f.default
    if not dataclasses.is_dataclass(default) or isinstance(default, type):
        return {}
    names = {g.name for g in dataclasses.fields(cls) if g.init}
    return {k: v for k, v in to_dict(default).items() if k in names}


def to_dict(cfg: Any) -> dict[str, Any]:
    """The plain nested dict of a config (tuples become lists), ready for YAML/JSON."""

    def plain(v: Any) -> Any:
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(cfg))


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge ``over`` into a copy of ``base``; nested sections merge, values replace."""
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML config file into a dict, with a one-line error for any problem."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{p}{line}: not valid YAML ({getattr(e, 'problem', e)})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: the top level must be a mapping of options")
    return data


def save_yaml(cfg: Any) -> str:
    """The YAML text of a config, fields in declaration order."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def iter_fields(cls: type, prefix: str = "") -> list[tuple[str, Any, Any, str]]:
    """Flatten a config tree: (dotted name, type, default, doc) for every leaf field.

    The default is the one a config built with no options really has: a section declared as
    ``field(default_factory=lambda: OptimConfig(lr=2e-4))`` shows lr 2e-4, not the class's own.
    """
    return [(name, tp, default, doc) for name, tp, default, doc, _ in _leaves(cls, prefix)]


def _leaves(cls: type, prefix: str = "",
            instance: Any = None) -> list[tuple[str, Any, Any, str, dataclasses.Field]]:
    """(dotted name, type, default, doc, field) per leaf; defaults read from ``instance`` if given."""
    out: list[tuple[str, Any, Any, str, dataclasses.Field]] = []
    hints = _resolved_hints(cls)
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if not f.init:
            continue
        name = f"{prefix}{f.name}"
        tp = hints[f.name]
        default = _field_default(f) if instance is None else getattr(instance, f.name)
        _, inner = _is_optional(tp)
        if dataclasses.is_dataclass(inner):
            # the section's own default instance (a recipe's preset values), when it has one
            sub = (default if dataclasses.is_dataclass(default)
                   and not isinstance(default, type) else None)
            out.extend(_leaves(inner, name + ".", sub))  # type: ignore[arg-type]
            continue
        out.append((name, tp, default, docs.get(f.name, ""), f))
    return out


def _field_default(f: dataclasses.Field) -> Any:
    """A field's default value (a fresh one from its factory), or MISSING when it is required."""
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``tree['a']['b'] = value`` for ``dotted == 'a.b'``."""
    *parents, leaf = dotted.split(".")
    node = tree
    for p in parents:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--{dotted}: '{p}' is a value, not a section")
    node[leaf] = value


def leaf_names(cls: type) -> list[str]:
    """Every valid dotted option name of a config tree."""
    return [name for name, *_ in iter_fields(cls)]


def parse_overrides(cls: type, args: list[str]) -> dict[str, Any]:
    """Turn ``['--a.b', '3', '--flag', '--c=x']`` into a nested dict, checking names.

    A boolean option given with no value means true (``--compile``); ``--no-compile``... is not
    supported on purpose: write ``--compile false``.
    """
    leaves = {name: (tp, f) for name, tp, _, _, f in _leaves(cls)}
    fields = {name: tp for name, (tp, _) in leaves.items()}
    out: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or arg == "--":
            raise ConfigError(f"unexpected argument '{arg}'; options look like --name value")
        name, eq, value = arg[2:].partition("=")
        name = name.replace("-", "_")
        if name not in fields:
            raise _unknown_key(name, list(fields), "")
        _, inner = _is_optional(fields[name])
        if not eq:
            nxt = args[i + 1] if i + 1 < len(args) else None
            if inner is bool and (nxt is None or nxt.startswith("--")):
                value = "true"
            elif nxt is None or (nxt.startswith("--") and len(nxt) > 2 and not _is_number(nxt)):
                raise ConfigError(f"--{name}: missing value (expected {type_name(fields[name])})")
            else:
                value = nxt
                i += 1
                # A list option also takes the values after it: --weights 0.7 0.3
                items = [value]
                while get_origin(inner) is list and i + 1 < len(args) and (
                    not args[i + 1].startswith("--")
                ):
                    items.append(args[i + 1])
                    i += 1
                value = items if len(items) > 1 else value
        value = coerce(value, fields[name], f"--{name}", finite=_finite(leaves[name][1]))
        set_dotted(out, name, value)
        i += 1
    return out


def _is_number(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def build(
    cls: type[T],
    argv: list[str],
    base: dict[str, Any] | None = None,
    resolve: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
) -> T:
    """Defaults < ``base`` < ``--config file.yaml`` < dotted overrides: the config of a command.

    ``resolve`` sees the merged dict before validation, e.g. to fill a section from a named
    preset underneath what the user set.
    """
    args = list(argv)
    data: dict[str, Any] = dict(base or {})
    while "--config" in args or any(a.startswith("--config=") for a in args):
        for i, a in enumerate(args):
            if a == "--config":
                if i + 1 >= len(args):
                    raise ConfigError("--config: missing the YAML file path")
                data = overlay(cls, data, load_yaml(args[i + 1]))
                del args[i : i + 2]
                break
            if a.startswith("--config="):
                data = overlay(cls, data, load_yaml(a.split("=", 1)[1]))
                del args[i]
                break
    data = overlay(cls, data, parse_overrides(cls, args))
    if resolve is not None:
        data = resolve(data)
    return from_dict(cls, data)


# --------------------------------------------------------------------------- shared sections


@dataclasses.dataclass
class OptimConfig:
    """AdamW and its guard-rails."""

    lr: float = 3e-3
    """Peak learning rate, reached at the end of warmup."""
    min_lr_ratio: float = 0.1
    """The cosine decay ends at lr * min_lr_ratio (the floor), not at zero."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2 (0.95 rather than 0.999 is steadier for transformers: GPT-3, Llama)."""
    eps: float = 1e-8
    """AdamW epsilon."""
    weight_decay: float = 0.1
    """Decoupled weight decay, applied to matrices (ndim >= 2) only, never to norms or biases."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping."""
    warmup_steps: int = 100
    """Linear warmup from 0 to lr over this many optimizer steps. Not used when
    optim.warmup_ratio is set (giving both is an error)."""
    warmup_ratio: float | None = None
    """Warm up over this share of the run's optimizer steps instead (in [0, 1), rounded up to
    whole steps; e.g. 0.1 of 95 steps = 10); null = use warmup_steps. The run's config.yaml
    records the resolved warmup_steps."""

    ALTERNATIVES: ClassVar[dict[str, str]] = {"warmup_ratio": "warmup_steps"}

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ConfigError(f"optim.lr must be > 0, got {self.lr}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"optim.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"optim.{name} must be in [0, 1), got {getattr(self, name)}")
        if self.weight_decay < 0 or self.grad_clip < 0 or self.warmup_steps < 0 or self.eps <= 0:
            raise ConfigError("optim.weight_decay, grad_clip and warmup_steps must be >= 0, eps > 0")
        if self.warmup_ratio is not None and not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"optim.warmup_ratio must be in [0, 1) or null, got "
                              f"{self.warmup_ratio}")


@dataclasses.dataclass
class TrainConfig:
    """The one training loop: how long, how big a batch, how often to log, evaluate and save."""

    max_steps: int = 1200
    """Number of optimizer steps; the cosine schedule ends here. The default (1200 x 16 x 256
    = 4.9M tokens, ~3 epochs of Shakespeare) takes about 7 minutes for llama-1m on 2 CPU cores.
    Not used when train.epochs is set (giving both is an error)."""
    epochs: float | None = None
    """Train for this many passes over the train split instead of max_steps (0.5 = half of it);
    null = use max_steps. Steps = epochs x train examples (pretrain: tokens) / what one optimizer
    step takes, rounded up. The run's config.yaml records the resolved max_steps."""
    batch_size: int = 16
    """Sequences per micro-batch."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step (tokens/step = batch_size*grad_accum*seq_len)."""
    seq_len: int | None = None
    """Training sequence length; null = the model's block_size."""
    label_smoothing: float = 0.0
    """Cross-entropy label smoothing (0 = none). Reported val loss never uses it."""
    seed: int = 1337
    """Seeds model init, data order and dropout: the same seed gives the same run on CPU."""
    log_every: int = 10
    """Write train loss, lr and tokens/s to metrics.jsonl every this many steps."""
    eval_every: int = 200
    """Evaluate val loss / perplexity / bits-per-byte every this many steps (and at the end)."""
    eval_tokens: int = 65536
    """Val tokens per evaluation (a fixed, deterministic slice of the val split)."""
    save_every: int = 400
    """Save a checkpoint every this many steps (and at the end)."""
    keep_last: int = 2
    """Keep this many most recent checkpoints (the best by val loss is always kept)."""
    threads: int | None = None
    """CPU threads for torch; null = torch's default."""
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Autocast precision of the forward pass: bf16 (GPUs since Ampere, recent CPUs), fp16 (with a
    gradient scaler) or fp32. Weights and optimizer states stay fp32."""
    compile: bool = False
    """torch.compile each block (checkpoints keep the uncompiled names)."""
    activation_checkpointing: bool = False
    """Recompute each block's activations in backward: less memory, ~1 extra forward per step."""
    max_bad_steps: int = 5
    """A step whose loss or gradient norm is NaN/inf is skipped; stop after this many in a row."""
    spike_factor: float = 3.0
    """Warn when a step's loss exceeds this multiple of the running average (0 disables)."""
    early_stop_patience: int | None = None
    """Stop when val loss has not improved for this many evaluations; null = never."""
    peak_tflops: float | None = None
    """Peak dense TFLOP/s of one device at the training precision (e.g. 989 for an H100 in bf16),
    to log MFU = achieved / peak FLOPs; null = MFU not logged."""
    profile: bool = False
    """Profile optimizer steps 3-5 with torch.profiler: a trace for TensorBoard / Perfetto in
    runs/<name>/profile/ and a table of the top operators (profile/top_ops.txt)."""
    trackers: list[str] = dataclasses.field(default_factory=lambda: ["tensorboard"])
    """Experiment trackers: tensorboard (event files in the run folder), wandb, mlflow; [] = only
    metrics.jsonl."""

    ALTERNATIVES: ClassVar[dict[str, str]] = {"epochs": "max_steps"}

    def __post_init__(self) -> None:
        if self.epochs is not None and not self.epochs > 0:
            raise ConfigError(f"train.epochs must be > 0 or null, got {self.epochs}")
        for name in ("max_steps", "batch_size", "grad_accum", "log_every", "eval_every",
                     "eval_tokens", "save_every", "keep_last"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if self.seq_len is not None and self.seq_len < 2:
            raise ConfigError(f"train.seq_len must be >= 2, got {self.seq_len}")
        if not 0 <= self.label_smoothing < 1:
            raise ConfigError(f"train.label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.max_bad_steps < 1:
            raise ConfigError(f"train.max_bad_steps must be >= 1, got {self.max_bad_steps}")
        if self.early_stop_patience is not None and self.early_stop_patience < 1:
            raise ConfigError("train.early_stop_patience must be >= 1 or null")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"train.threads must be >= 1, got {self.threads}")


@dataclasses.dataclass
class DistConfig:
    """Multi-GPU / multi-node training through torchrun (PyTorch's own distributed engine)."""

    strategy: Literal["auto", "none", "ddp", "fsdp"] = "auto"
    """auto = ddp when launched by torchrun with several processes, else none. fsdp shards
    parameters, gradients and optimizer states (FSDP2, fully_shard)."""
    reshard_after_forward: bool = True
    """FSDP only: true = ZeRO-3 (free gathered parameters after forward); false = ZeRO-2-like
    (keep them until backward: faster, more memory)."""
    cpu_offload: bool = False
    """FSDP only: keep parameters, gradients and optimizer states in CPU memory (ZeRO-Offload),
    for models larger than GPU memory."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto = cuda when available, else cpu."""
    tp: int = 1
    """Tensor-parallel degree (decoder only): each block's attention heads and MLP are split
    over this many neighbouring ranks (column/row-parallel linears). The other world_size/tp
    ranks are data-parallel: FSDP over them (strategy auto or fsdp). Must divide the number of
    processes, n_head and n_kv_head."""

    def __post_init__(self) -> None:
        if self.tp < 1:
            raise ConfigError(f"dist.tp must be >= 1, got {self.tp}")

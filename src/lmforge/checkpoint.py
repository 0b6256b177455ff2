"""Atomic, pickle-free checkpoints: weights, optimizer, RNG and progress counters.

A run directory holds its checkpoints and two pointer files::

    <run>/latest                          # text: name of the newest checkpoint, e.g. step_00000200
    <run>/best                            # text: name of the checkpoint with the best val loss
    <run>/checkpoints/step_00000200/
        model.safetensors                 # unwrapped, uncompiled state dict; tied tensors stored once
        optimizer.safetensors             # every optimizer-state tensor, keys like state.3.exp_avg
        rng.safetensors                   # torch CPU/CUDA, numpy and Python RNG + caller's extras
        meta.json                         # TrainState, caller's info, optimizer's non-tensor part

A run sharded with FSDP or tensor parallelism writes its checkpoints in parallel instead, every rank its own shard,
through ``torch.distributed.checkpoint`` (DCP) with its safetensors storage::

    <run>/checkpoints/step_00000200/
        model/shard-0000R-model-00001-of-00001.safetensors      # rank R's slice of every tensor
        optimizer/shard-0000R-model-00001-of-00001.safetensors  # keys like layer.weight.exp_avg
        rng.safetensors, meta.json                              # as above; "layout": "sharded"

Each shard records its slices' offsets as JSON in the safetensors header, so DCP reassembles the
tensors for any world size, or whole in one process (``load_model_weights``, ``load_checkpoint``);
DCP's default format would add a pickled ``.metadata`` file, which this layout has no need of.

Tensors live in safetensors and everything else in JSON, so opening a checkpoint someone sent
you never runs their code (``torch.load`` is not used at all). Each step directory is built under
a temporary name and renamed into place once every file is fsynced, and meta.json is written last:
a ``step_*`` directory with a valid meta.json is complete. Save on rank 0 only, except
``save_sharded_checkpoint`` (every rank calls it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import random
import re
import shutil
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file
from torch import nn

from lmforge.config import UserError
from lmforge.utils.io import atomic_dir, atomic_write_text, chmod_like_open, publish_dir

log = logging.getLogger(__name__)

FORMAT = "lmforge-checkpoint"
FORMAT_VERSION = 2  # the newest this lmforge reads; single-file checkpoints are still written as 1
SINGLE_FILE_VERSION = 1
SHARDED_VERSION = 2
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
RNG_FILE = "rng.safetensors"
META_FILE = "meta.json"
SHARDED_MODEL = "model"  # folders of DCP safetensors shards in a sharded checkpoint
SHARDED_OPTIMIZER = "optimizer"
CHECKPOINTS = "checkpoints"
LATEST = "latest"
BEST = "best"
# f"{step:08d}" grows past 8 digits after step 99,999,999; sorting is by the number, not the name.
_STEP_DIR = re.compile(r"step_(\d{8,})")
_TENSOR_REF = "__tensor__"  # JSON placeholder for a tensor stored in the sibling safetensors file
_META_KEY = "lmforge"  # the one safetensors metadata entry we write (JSON text)


@dataclass
class TrainState:
    """Progress counters saved in meta.json; everything here must be JSON-able."""

    step: int = 0
    """Optimizer steps taken; the LR schedule is a pure function of it (the schedule position)."""
    tokens: int = 0
    """Training tokens consumed so far."""
    best_val_loss: float | None = None
    """Lowest validation loss seen so far; null before the first evaluation."""


# --------------------------------------------------------------------------- locating checkpoints


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    """Where the checkpoint of ``step`` lives inside ``run_dir``."""
    return Path(run_dir) / CHECKPOINTS / f"step_{step:08d}"


def _check_meta(ckpt: Path) -> dict:
    """Parse and validate ``ckpt``/meta.json; UserError if the checkpoint is not complete."""
    fix = "it is incomplete or not an lmforge checkpoint; pick another checkpoint or delete it"
    try:
        meta = json.loads((ckpt / META_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"checkpoint {ckpt} has no readable {META_FILE} ({e}); {fix}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise UserError(f"checkpoint {ckpt}: {META_FILE} is not an lmforge checkpoint record; {fix}")
    version = meta.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise UserError(
            f"checkpoint {ckpt} has format version {version!r} but this lmforge reads up to "
            f"{FORMAT_VERSION}; upgrade lmforge to load it"
        )
    missing = [f for f in meta.get("files", []) if not (ckpt / f).is_file()]
    if missing:
        raise UserError(f"checkpoint {ckpt} is missing {missing[0]}; {fix}")
    return meta


def _is_complete(ckpt: Path) -> bool:
    try:
        _check_meta(ckpt)
    except UserError:
        return False
    return True


def _complete_steps(run_dir: Path) -> list[tuple[int, Path]]:
    """Complete ``step_*`` checkpoints of ``run_dir``, oldest first; temp-named dirs never match."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_DIR.fullmatch(p.name)
        if m and p.is_dir() and _is_complete(p):
            found.append((int(m.group(1)), p))
    return sorted(found)


def _read_pointer(run_dir: Path, name: str) -> Path | None:
    """The complete checkpoint a pointer file names, or None (missing, stale or malformed)."""
    try:
        target = (Path(run_dir) / name).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None
    # Only a bare step_N name is honoured, so a hand-edited pointer cannot escape the run dir.
    if not _STEP_DIR.fullmatch(target):
        return None
    ckpt = Path(run_dir) / CHECKPOINTS / target
    return ckpt if _is_complete(ckpt) else None


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint ``<run>/latest`` names, else the newest complete ``step_*`` dir, else None."""
    pointed = _read_pointer(run_dir, LATEST)
    if pointed is not None:
        return pointed
    steps = _complete_steps(run_dir)
    return steps[-1][1] if steps else None


def _resolve(path: Path) -> Path:
    """A checkpoint dir as given, or a run dir's latest checkpoint; UserError if neither."""
    path = Path(path)
    if (path / META_FILE).is_file():
        return path
    if not path.is_dir():
        raise UserError(
            f"checkpoint {path} does not exist; pass a checkpoint directory "
            f"(<run>/{CHECKPOINTS}/step_N) or a run directory"
        )
    ckpt = latest_checkpoint(path)
    if ckpt is None:
        raise UserError(
            f"no complete checkpoint in {path} (looked for {path}/{CHECKPOINTS}/step_*/{META_FILE}); "
            f"train first or pass a checkpoint directory"
        )
    return ckpt


def read_meta(path: Path) -> dict:
    """The validated meta.json of a checkpoint dir (or of a run dir's latest checkpoint)."""
    return _check_meta(_resolve(path))


# --------------------------------------------------------------------------- tensor files


def _storage_key(t: torch.Tensor) -> tuple:
    return (t.device, t.untyped_storage().data_ptr())


def _view_key(t: torch.Tensor) -> tuple:
    return (*_storage_key(t), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)


def _alias_map(tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    """alias -> first key holding the very same view (same storage, offset, shape, stride)."""
    first: dict[tuple, str] = {}
    aliases = {}
    for key, t in tensors.items():
        canonical = first.setdefault(_view_key(t), key)
        if canonical != key:
            aliases[key] = canonical
    return aliases


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor], info: dict | None = None) -> None:
    """Write ``tensors`` to one safetensors file; exact aliases are stored once and recorded.

    safetensors refuses tensors that share memory, so tied weights become one entry plus an
    alias, and a tensor overlapping another only partly is stored as its own copy. Aliases are
    found before moving to CPU: ``.cpu()`` of two tied CUDA tensors gives two separate copies.
    """
    aliases = _alias_map(tensors)
    seen: set[tuple] = set()
    out = {}
    for key, t in tensors.items():
        if key in aliases:
            continue
        overlaps = t.numel() > 0 and _storage_key(t) in seen
        seen.add(_storage_key(t))
        t = t.detach().cpu().contiguous()
        out[key] = t.clone() if overlaps else t
    meta = {"aliases": aliases, **(info or {})}
    save_file(out, str(path), metadata={_META_KEY: json.dumps(meta)})
    chmod_like_open(path)  # safetensors writes 0600


def _load_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a file written by ``_save_tensors``: (tensors with aliases restored, its metadata)."""
    try:
        tensors = load_file(str(path), device="cpu")
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get(_META_KEY, "{}"))
    except (OSError, SafetensorError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read {path} ({e}); the checkpoint is damaged, pick another") from None
    for alias, canonical in meta.get("aliases", {}).items():
        tensors[alias] = tensors[canonical]
    return tensors, meta


# --------------------------------------------------------------------------- model weights


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module underneath DDP / DataParallel / ``torch.compile`` wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def _clean_key(key: str) -> str:
    # torch.compile applied to a submodule (per-block compile) puts _orig_mod inside the key.
    return ".".join(part for part in key.split(".") if part != "_orig_mod")


def _model_state(model: nn.Module) -> dict[str, tuple[str, torch.Tensor]]:
    """Clean key -> (the key in the module's own state dict, tensor)."""
    out: dict[str, tuple[str, torch.Tensor]] = {}
    for key, t in unwrap_model(model).state_dict().items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"state-dict entry {key} is a {type(t).__name__}, not a tensor")
        clean = _clean_key(key)
        assert clean not in out, f"state-dict keys {out[clean][0]} and {key} both map to {clean}"
        out[clean] = (key, t)
    return out


def _shape(t: torch.Tensor) -> str:
    return str(tuple(t.shape))


def _match_model(
    ckpt: Path, weights: dict[str, torch.Tensor], model: nn.Module
) -> tuple[dict[str, torch.Tensor], set[str]]:
    """Map the file's tensors onto the model's own keys, or raise UserError at the first mismatch.

    Returns (own key -> tensor to load, own keys left out because a tied twin is loaded instead).
    """
    state = _model_state(model)
    weights = {_clean_key(k): v for k, v in weights.items()}
    # Checkpoints written by other tools often kept the DDP wrapper's "module." prefix.
    if weights and all(k.startswith("module.") for k in weights) and not any(
        k.startswith("module.") for k in state
    ):
        weights = {k.removeprefix("module."): v for k, v in weights.items()}
    bad = f"checkpoint {ckpt} does not match the model"
    hint = "was it trained with a different --model config?"
    tied = _alias_map({k: t for k, (_, t) in state.items()})
    group: dict[str, list[str]] = {}
    for key in state:
        group.setdefault(tied.get(key, key), []).append(key)
    to_load, skipped = {}, set()
    for key, (own, ref) in state.items():
        twins = group[tied.get(key, key)]
        if key not in weights:
            if not any(k in weights for k in twins):
                raise UserError(f"{bad}: tensor {key} is in the model but not in the file; {hint}")
            skipped.add(own)
            continue
        if weights[key].shape != ref.shape:
            raise UserError(
                f"{bad}: tensor {key} has shape {_shape(weights[key])} in the file but "
                f"{_shape(ref)} in the model; {hint}"
            )
        first = next(k for k in twins if k in weights)
        if not torch.equal(weights[first], weights[key]):
            raise UserError(f"{bad}: the model ties {key} to {first} but the file holds "
                            f"different values for them; {hint}")
        to_load[own] = weights[key]
    for key in weights:
        if key not in state:
            raise UserError(f"{bad}: tensor {key} is in the file but not in the model; {hint}")
    return to_load, skipped


def _apply_model(model: nn.Module, matched: tuple[dict[str, torch.Tensor], set[str]]) -> None:
    to_load, skipped = matched
    result = unwrap_model(model).load_state_dict(to_load, strict=False)
    # Only tied twins may be absent: writing one of them writes the shared storage.
    assert not result.unexpected_keys and set(result.missing_keys) <= skipped, result


def load_model_weights(path: Path, model: nn.Module) -> None:
    """Load weights only (for generate/eval) from a checkpoint dir or a run dir's latest one."""
    ckpt = _resolve(path)
    weights = _load_weights(ckpt, _check_meta(ckpt))
    _apply_model(model, _match_model(ckpt, weights, model))


class WeightReader:
    """Reads one model tensor at a time by clean name (``reader(name)``, None when absent);
    ``names`` holds every clean name the checkpoint has, ``stored(name)`` the entry it is read
    from (tied weights are stored once: their aliases share an entry)."""

    def __init__(self, names: dict[str, str], get: Callable[[str], torch.Tensor]) -> None:
        self._names, self._get = names, get

    @property
    def names(self) -> set[str]:
        """Every clean tensor name in the checkpoint, aliases included."""
        return set(self._names)

    def stored(self, name: str) -> str:
        """The stored entry ``name`` is read from."""
        return self._names[name]

    def __call__(self, name: str) -> torch.Tensor | None:
        return self._get(self._names[name]) if name in self._names else None


@contextlib.contextmanager
def open_weights(path: Path) -> Iterator[WeightReader]:
    """A reader of one model tensor at a time, by clean name (None when absent), while open.

    A single-file checkpoint is read from disk tensor by tensor, each through its own short
    ``safe_open`` (the file is memory-mapped: a mapping kept open would count every page read
    so far in the process's RSS), so a caller that converts each tensor as it arrives
    (quantized loading, ``stream_model_weights``) never holds them all; a sharded one is read
    whole first.
    """
    ckpt = _resolve(path)
    meta = _check_meta(ckpt)
    if is_sharded(meta):
        weights = {_clean_key(k): v for k, v in _load_weights(ckpt, meta).items()}
        yield WeightReader({k: k for k in weights}, weights.__getitem__)
        return
    file = ckpt / MODEL_FILE
    try:
        with safe_open(str(file), framework="pt") as f:
            aliases = json.loads((f.metadata() or {}).get(_META_KEY, "{}")).get("aliases", {})
            stored: list[str] = f.keys()
    except (OSError, SafetensorError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read {file} ({e}); the checkpoint is damaged, pick another") from None
    names = {_clean_key(k): k for k in stored}
    names.update({_clean_key(a): names[_clean_key(c)] for a, c in aliases.items()})
    if names and all(k.startswith("module.") for k in names):  # a DDP wrapper's prefix
        names = {k.removeprefix("module."): v for k, v in names.items()}

    def get(key: str) -> torch.Tensor:
        with safe_open(str(file), framework="pt") as f:
            return f.get_tensor(key)  # a tensor of its own (a copy), the mapping closed

    yield WeightReader(names, get)


def _tensor_slots(model: nn.Module) -> dict[int, list[tuple[nn.Module, str, str, torch.Tensor]]]:
    """Every parameter and persistent buffer of ``model`` as (module, attribute, clean name,
    tensor), grouped by tensor: a tied weight is one group of several names."""
    groups: dict[int, list[tuple[nn.Module, str, str, torch.Tensor]]] = {}
    for prefix, module in model.named_modules(remove_duplicate=False):
        own = [*module._parameters.items(),
               *((k, b) for k, b in module._buffers.items()
                 if k not in module._non_persistent_buffers_set)]
        for key, t in own:
            if t is not None:
                name = _clean_key(f"{prefix}.{key}" if prefix else key)
                groups.setdefault(id(t), []).append((module, key, name, t))
    return groups  # a module shared under several names lists its tensors under each


@torch.no_grad()
def stream_model_weights(path: Path, model: nn.Module, device: torch.device) -> None:
    """Fill ``model``, built on the meta device and cast to its dtype there, from a checkpoint
    one tensor at a time: each is read, copied to ``device`` in its dtype and becomes the
    parameter or buffer itself, so the load holds the weights once plus at most one tensor in
    flight, instead of the whole file beside the allocated model.

    Tied weights stay tied (one tensor for the group) and the checks are
    ``load_model_weights``': a UserError for a missing, extra or misshaped tensor, or tied
    twins stored with different values. Buffers the state dict leaves out (position tables)
    stay on meta for the model's ``init_buffers``.
    """
    ckpt = _resolve(path)
    bad = f"checkpoint {ckpt} does not match the model"
    hint = "was it trained with a different --model config?"
    with open_weights(ckpt) as read:
        groups = _tensor_slots(model)
        wanted = {n for slots in groups.values() for _, _, n, _ in slots}
        extra = sorted(read.names - wanted)
        if extra:
            raise UserError(f"{bad}: tensor {extra[0]} is in the file but not in the model; {hint}")
        for slots in groups.values():
            present = [n for _, _, n, _ in slots if n in read.names]
            ref = slots[0][3]
            if not present:
                raise UserError(f"{bad}: tensor {slots[0][2]} is in the model but not in the "
                                f"file; {hint}")
            loaded = read(present[0])
            assert loaded is not None
            if loaded.shape != ref.shape:
                raise UserError(f"{bad}: tensor {present[0]} has shape {_shape(loaded)} in the "
                                f"file but {_shape(ref)} in the model; {hint}")
            for twin in present[1:]:  # stored apart (not as an alias): the values must agree
                if read.stored(twin) != read.stored(present[0]):
                    other = read(twin)
                    if other is None or not torch.equal(other, loaded):
                        raise UserError(f"{bad}: the model ties {twin} to {present[0]} but "
                                        f"the file holds different values for them; {hint}")
            # A copy of its own even when nothing changes: safetensors hands out views of a
            # private mapping of the whole file, which a model kept for hours must not depend on
            # (a file truncated under it would be a SIGBUS); the mapping closes with ``loaded``.
            tensor = loaded.to(device, ref.dtype, copy=True)
            del loaded
            new = (nn.Parameter(tensor, requires_grad=ref.requires_grad)
                   if isinstance(ref, nn.Parameter) else tensor)
            for module, key, _, _ in slots:
                store = module._parameters if key in module._parameters else module._buffers
                store[key] = new


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """Every model tensor of a checkpoint (or a run's latest), whole, on CPU, by clean name."""
    ckpt = _resolve(path)
    return _load_weights(ckpt, _check_meta(ckpt))


def is_sharded(meta: dict) -> bool:
    """True for a checkpoint written by ``save_sharded_checkpoint`` (given its meta.json)."""
    return meta.get("layout") == "sharded"


def _load_weights(ckpt: Path, meta: dict) -> dict[str, torch.Tensor]:
    """Every model tensor of a checkpoint, whole, on CPU (either layout)."""
    if not is_sharded(meta):
        return _load_tensors(ckpt / MODEL_FILE)[0]
    weights = _read_whole(ckpt / SHARDED_MODEL)
    for alias, canonical in meta.get("aliases", {}).items():
        weights[alias] = weights[canonical]
    return weights


# --------------------------------------------------------------------------- optimizer


def _split_tensors(obj: Any, prefix: str, out: dict[str, torch.Tensor]) -> Any:
    """Replace each tensor in nested dicts/lists by a reference; collect them in ``out``.

    ``state[3]["exp_avg"]`` becomes the key ``state.3.exp_avg``; numbers stay in the JSON.
    """
    def sub(name: object) -> str:
        return f"{prefix}.{name}" if prefix else str(name)

    if isinstance(obj, torch.Tensor):
        out[prefix] = obj
        return {_TENSOR_REF: prefix}
    if isinstance(obj, dict):
        return {str(k): _split_tensors(v, sub(k), out) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_split_tensors(v, sub(i), out) for i, v in enumerate(obj)]
    return obj


def _join_tensors(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of ``_split_tensors`` (tuples come back as lists)."""
    if isinstance(obj, dict):
        if set(obj) == {_TENSOR_REF}:
            return tensors[obj[_TENSOR_REF]]
        return {k: _join_tensors(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_join_tensors(v, tensors) for v in obj]
    return obj


def _optimizer_state_dict(
    ckpt: Path, saved: dict, tensors: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer
) -> dict:
    """Rebuild a torch optimizer state dict from meta.json + optimizer.safetensors."""
    try:
        sd = _join_tensors(saved, tensors)
    except KeyError as e:
        raise UserError(f"checkpoint {ckpt}: {OPTIMIZER_FILE} lacks tensor {e}; "
                        f"the checkpoint is damaged, pick another") from None
    sd["state"] = {int(k): v for k, v in sd["state"].items()}  # JSON made the param ids strings
    have = [len(g["params"]) for g in sd["param_groups"]]
    want = [len(g["params"]) for g in optimizer.param_groups]
    if have != want:
        raise UserError(
            f"optimizer state in {ckpt} does not match the optimizer: parameter groups of sizes "
            f"{have} in the file but {want} here; was it trained with other trainable parameters "
            f"(freezing, LoRA) or a different --model config?"
        )
    # JSON has no tuples: give back tuples where the live optimizer has them (AdamW's betas).
    for group, live in zip(sd["param_groups"], optimizer.param_groups):
        for k, v in group.items():
            if isinstance(live.get(k), tuple) and isinstance(v, list):
                group[k] = tuple(v)
    return sd


# --------------------------------------------------------------------------- RNG


def _rng_snapshot(extra: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict]:
    """Every global RNG state (+ the caller's extras) as tensors plus a JSON-able remainder."""
    tensors = {"torch.cpu": torch.get_rng_state()}
    cuda: list[torch.Tensor] = []
    # Only when CUDA is in use already: asking would otherwise initialize CUDA in a CPU run.
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        cuda = torch.cuda.get_rng_state_all()
    for i, s in enumerate(cuda):
        tensors[f"torch.cuda.{i}"] = s
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors["numpy.keys"] = torch.from_numpy(np.asarray(keys, dtype=np.int64))
    version, internal, gauss_next = random.getstate()
    tensors["python.state"] = torch.tensor(internal, dtype=torch.int64)  # 624 words + index
    for name, t in extra.items():
        tensors[f"extra.{name}"] = t
    info = {
        "cuda_devices": len(cuda),
        # Python floats survive JSON exactly (repr round-trips), so nothing is lost here.
        "numpy": {"kind": kind, "pos": int(pos), "has_gauss": int(has_gauss),
                  "cached_gaussian": float(cached)},
        "python": {"version": version, "gauss_next": gauss_next},
    }
    return tensors, info


def _restore_rng(tensors: dict[str, torch.Tensor], info: dict) -> None:
    torch.set_rng_state(tensors["torch.cpu"])
    cuda = [tensors[f"torch.cuda.{i}"] for i in range(info["cuda_devices"])]
    n = min(len(cuda), torch.cuda.device_count()) if torch.cuda.is_available() else 0
    for i in range(n):
        torch.cuda.set_rng_state(cuda[i], i)
    if n < len(cuda):
        log.warning("checkpoint holds CUDA RNG state for %d device(s); restored %d", len(cuda), n)
    npi = info["numpy"]
    keys = tensors["numpy.keys"].numpy().astype(np.uint32)
    np.random.set_state((npi["kind"], keys, npi["pos"], npi["has_gauss"], npi["cached_gaussian"]))
    py = info["python"]
    internal = tuple(int(x) for x in tensors["python.state"].tolist())
    random.setstate((py["version"], internal, py["gauss_next"]))


# --------------------------------------------------------------------------- save / load


def _write_checkpoint(
    out: Path,
    state: TrainState,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    extra: dict[str, torch.Tensor],
    info: dict,
) -> None:
    """Write every file of one checkpoint into ``out``; meta.json last, as the completion mark."""
    _save_tensors(out / MODEL_FILE, {k: t for k, (_, t) in _model_state(model).items()})
    files = [MODEL_FILE]
    opt_json = None
    if optimizer is not None:
        opt_tensors: dict[str, torch.Tensor] = {}
        opt_json = _split_tensors(optimizer.state_dict(), "", opt_tensors)
        _save_tensors(out / OPTIMIZER_FILE, opt_tensors)
        files.append(OPTIMIZER_FILE)
    _write_rng_and_meta(out, state, extra, info, files,
                        {"format_version": SINGLE_FILE_VERSION, "optimizer": opt_json})


def _write_rng_and_meta(out: Path, state: TrainState, extra: dict[str, torch.Tensor],
                        info: dict, files: list[str], record: dict) -> None:
    """rng.safetensors, then meta.json (the completion mark) listing ``files`` and ``record``."""
    rng_tensors, rng_info = _rng_snapshot(extra)
    _save_tensors(out / RNG_FILE, rng_tensors, rng_info)
    record = {
        "info": info,
        "extra": sorted(extra),
        "files": [*files, RNG_FILE],
        "torch_version": torch.__version__,
        **record,
    }
    progress = dataclasses.asdict(state)  # step, tokens, best_val_loss at the top, for readers
    assert not progress.keys() & record.keys(), "a TrainState field shadows a meta.json key"
    meta = {"format": FORMAT, **progress, **record}
    (out / META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")


def _train_state(meta: dict) -> TrainState:
    # A field added to TrainState later keeps its default when an older checkpoint lacks it.
    return TrainState(**{f.name: meta[f.name] for f in dataclasses.fields(TrainState)
                         if f.name in meta})


def _improves_best(run_dir: Path, state: TrainState) -> bool:
    if state.best_val_loss is None:
        return False
    best = _read_pointer(run_dir, BEST)
    if best is None:
        return True
    recorded = _check_meta(best).get("best_val_loss")
    return recorded is None or state.best_val_loss < recorded


def _prune(run_dir: Path, keep_last: int, protect: set[str]) -> None:
    """Delete complete checkpoints older than the newest ``keep_last``, except ``protect``."""
    if keep_last < 1:
        return
    for _, ckpt in _complete_steps(run_dir)[:-keep_last]:
        if ckpt.name in protect:
            continue
        # Rename first: a deletion cut short leaves a temp-named dir, never a half-empty step_*.
        doomed = ckpt.with_name(f".{ckpt.name}.deleting")
        shutil.rmtree(doomed, ignore_errors=True)
        os.replace(ckpt, doomed)
        shutil.rmtree(doomed, ignore_errors=True)


def save_checkpoint(
    run_dir: Path,
    state: TrainState,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    extra: dict[str, torch.Tensor] | None = None,
    info: dict | None = None,
    keep_last: int = 3,
    *,
    is_best: bool | None = None,
) -> Path:
    """Atomically write ``<run>/checkpoints/step_<step>/``, update the pointers, prune; return it.

    ``extra`` holds named tensors to restore with the run (e.g. the data loader's generator
    state; returned on CPU by ``load_checkpoint``); ``info`` any JSON-able dict (metrics, config).
    ``is_best=None`` marks this checkpoint best when ``state.best_val_loss`` beats the one the
    ``best`` pointer records; that assumes the val loss was measured on these very weights, so
    pass ``is_best`` explicitly when saves and evaluations fall on different steps.
    ``keep_last < 1`` keeps every checkpoint. Saving a step that exists replaces it.
    """
    run_dir = Path(run_dir)
    info = dict(info or {})
    extra = dict(extra or {})
    json.dumps(info)  # fail before writing anything if the caller's info is not JSON-able
    if is_best is None:
        is_best = _improves_best(run_dir, state)
    final = checkpoint_dir(run_dir, state.step)
    with atomic_dir(final, overwrite=True) as tmp:
        _write_checkpoint(tmp, state, model, optimizer, extra, info)
    _point_and_prune(run_dir, final, is_best, keep_last)
    return final


def _point_and_prune(run_dir: Path, final: Path, is_best: bool, keep_last: int) -> None:
    atomic_write_text(run_dir / LATEST, final.name + "\n")
    if is_best:
        atomic_write_text(run_dir / BEST, final.name + "\n")
    best = _read_pointer(run_dir, BEST)
    _prune(run_dir, keep_last, {final.name} | ({best.name} if best else set()))


def load_checkpoint(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    restore_rng: bool = True,
) -> tuple[TrainState, dict[str, torch.Tensor], dict]:
    """Restore a checkpoint (or a run dir's latest) into ``model`` / ``optimizer``.

    Returns (train state, extra tensors on CPU, info). Everything is read and checked before the
    caller's objects change, so a mismatch raises UserError with the model untouched.
    """
    ckpt = _resolve(path)
    meta = _check_meta(ckpt)
    matched = _match_model(ckpt, _load_weights(ckpt, meta), model)
    opt_sd = None
    if optimizer is not None:
        if meta.get("optimizer") is None:
            raise UserError(f"checkpoint {ckpt} was saved without optimizer state, so it cannot "
                            f"resume training; start a new run from its weights instead")
        if is_sharded(meta):
            opt_sd = _named_optimizer_state(ckpt, meta, _read_whole(ckpt / SHARDED_OPTIMIZER))
            _check_named_optimizer(ckpt, opt_sd, model, optimizer)
        else:
            opt_tensors, _ = _load_tensors(ckpt / OPTIMIZER_FILE)
            opt_sd = _optimizer_state_dict(ckpt, meta["optimizer"], opt_tensors, optimizer)
    rng_tensors, rng_info = _load_tensors(ckpt / RNG_FILE)
    _apply_model(model, matched)
    if opt_sd is not None:
        assert optimizer is not None
        try:
            if is_sharded(meta):  # keyed by parameter name: map the names onto this optimizer
                from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

                set_optimizer_state_dict(unwrap_model(model), optimizer, opt_sd)
            else:
                optimizer.load_state_dict(opt_sd)
        except (ValueError, KeyError) as e:
            raise UserError(f"optimizer state in {ckpt} does not match the optimizer ({e}); "
                            f"was it trained with another optimizer?") from None
    if restore_rng:
        _restore_rng(rng_tensors, rng_info)
    extra = {k.removeprefix("extra."): t for k, t in rng_tensors.items() if k.startswith("extra.")}
    return _train_state(meta), extra, meta.get("info", {})


# --------------------------------------------------------------------------- sharded (FSDP, DCP)


def _local(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def _sharded_model_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(this rank's slice of every tensor but tied twins, alias -> canonical key)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    sd = get_model_state_dict(model)
    # Tied weights are two DTensors over one local storage; safetensors refuses shared memory.
    aliases = _alias_map({k: _local(v) for k, v in sd.items()})
    return {k: v for k, v in sd.items() if k not in aliases}, aliases


def _split_optimizer(osd: dict) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """A name-keyed optimizer state -> ({"<param>.<name>": tensor}, non-tensor per-param state)."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict] = {}
    for param, entry in osd["state"].items():
        for name, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{param}.{name}"] = value
            else:
                scalars.setdefault(param, {})[name] = value
    return tensors, scalars


def _named_optimizer_state(ckpt: Path, meta: dict, tensors: dict[str, torch.Tensor]) -> dict:
    """The name-keyed optimizer state dict of a sharded checkpoint, from its tensors + meta."""
    saved = meta["optimizer"]
    state: dict[str, dict] = {p: dict(v) for p, v in saved.get("scalars", {}).items()}
    for key, t in tensors.items():
        param, name = key.rsplit(".", 1)
        state.setdefault(param, {})[name] = t
    groups = saved["param_groups"]
    for group in groups:  # JSON has no tuples; AdamW's betas were one
        if isinstance(group.get("betas"), list):
            group["betas"] = tuple(group["betas"])
    missing = {p for g in groups for p in g["params"]} - state.keys()
    if state and missing:
        raise UserError(f"checkpoint {ckpt}: {SHARDED_OPTIMIZER}/ lacks the state of "
                        f"{sorted(missing)[0]}; the checkpoint is damaged, pick another")
    return {"state": state, "param_groups": groups}


def _check_named_optimizer(ckpt: Path, osd: dict, model: nn.Module,
                           optimizer: torch.optim.Optimizer) -> None:
    """UserError unless the saved groups name exactly the parameters this optimizer trains."""
    names = {id(p): _clean_key(n) for n, p in unwrap_model(model).named_parameters()}
    have = [sorted(g["params"]) for g in osd["param_groups"]]
    want = [sorted(names[id(p)] for p in g["params"]) for g in optimizer.param_groups]
    if have != want:
        raise UserError(
            f"optimizer state in {ckpt} does not match the optimizer: parameter groups of sizes "
            f"{[len(g) for g in have]} in the file but {[len(g) for g in want]} here; was it "
            f"trained with other trainable parameters (freezing, LoRA) or another --model config?")


def _read_whole(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a DCP safetensors folder, reassembled whole in this process, on CPU."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    try:
        md = HuggingFaceStorageReader(str(folder)).read_metadata()
        out = {k: torch.empty(m.size, dtype=m.properties.dtype)
               for k, m in md.state_dict_metadata.items()}  # type: ignore[union-attr]
        with warnings.catch_warnings():  # "...assuming the intent is to load in a single process"
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(out, storage_reader=HuggingFaceStorageReader(str(folder)), no_dist=True)
    except (OSError, SafetensorError, ValueError, RuntimeError, KeyError) as e:
        raise UserError(f"cannot read the shards in {folder} ({e}); the checkpoint is damaged, "
                        f"pick another") from None
    return out


def _check_against_file(ckpt: Path, folder: Path, want: dict[str, torch.Tensor],
                        what: str) -> None:
    """UserError unless ``folder``'s shards hold exactly ``want``'s keys with the same shapes."""
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    try:
        md = HuggingFaceStorageReader(str(folder)).read_metadata().state_dict_metadata
    except (OSError, SafetensorError, ValueError, KeyError) as e:
        raise UserError(f"cannot read the shards in {folder} ({e}); the checkpoint is damaged, "
                        f"pick another") from None
    bad = f"checkpoint {ckpt} does not match the {what}"
    hint = "was it trained with a different --model config or other trainable parameters?"
    for key, t in want.items():
        if key not in md:
            raise UserError(f"{bad}: tensor {key} is in the {what} but not in the file; {hint}")
        if tuple(md[key].size) != tuple(t.shape):  # type: ignore[union-attr]
            raise UserError(f"{bad}: tensor {key} has shape {tuple(md[key].size)} in the file "  # type: ignore[union-attr]
                            f"but {_shape(t)} in the {what}; {hint}")
    extra = sorted(md.keys() - want.keys())
    if extra:
        raise UserError(f"{bad}: tensor {extra[0]} is in the file but not in the {what}; {hint}")


def save_sharded_checkpoint(
    run_dir: Path,
    state: TrainState,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    extra: dict[str, torch.Tensor] | None = None,
    info: dict | None = None,
    keep_last: int = 3,
    *,
    is_best: bool,
) -> Path:
    """Collective: every rank writes its own shard of an FSDP model (and optimizer) with DCP.

    All ranks fill one temporary folder (on a filesystem they share); once DCP has finished,
    rank 0 adds rng.safetensors (its RNG) and meta.json, fsyncs and renames the folder into
    place, then updates the pointers and prunes, as ``save_checkpoint`` does.
    """
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    run_dir = Path(run_dir)
    info, extra = dict(info or {}), dict(extra or {})
    json.dumps(info)
    main = dist.get_rank() == 0
    final = checkpoint_dir(run_dir, state.step)
    tmp = final.with_name(f".{final.name}.sharded.tmp")  # the same name on every rank
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    done = False
    try:
        weights, aliases = _sharded_model_state(model)
        dcp.save(weights, storage_writer=HuggingFaceStorageWriter(
            str(tmp / SHARDED_MODEL), save_distributed=True))
        opt_json = None
        if optimizer is not None:
            osd = get_optimizer_state_dict(model, optimizer)
            tensors, scalars = _split_optimizer(osd)
            dcp.save(tensors, storage_writer=HuggingFaceStorageWriter(
                str(tmp / SHARDED_OPTIMIZER), save_distributed=True))
            opt_json = {"param_groups": osd["param_groups"], "scalars": scalars}
        if main:
            files = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*.safetensors"))
            _write_rng_and_meta(tmp, state, extra, info, files, {
                "format_version": SHARDED_VERSION, "layout": "sharded",
                "world_size": dist.get_world_size(), "aliases": aliases,
                "optimizer": opt_json})
            publish_dir(tmp, final, overwrite=True)
            _point_and_prune(run_dir, final, is_best, keep_last)
        done = True
    finally:
        if main and not done:
            shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier()
    return final


def load_sharded_checkpoint(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    restore_rng: bool = True,
) -> tuple[TrainState, dict[str, torch.Tensor], dict]:
    """Collective: load a sharded checkpoint into an FSDP model (and optimizer) at any world size.

    DCP reads on each rank just the slices its shards need. Returns what ``load_checkpoint``
    returns; keys and shapes are checked before anything is loaded.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader
    from torch.distributed.checkpoint.state_dict import (
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    ckpt = _resolve(path)
    meta = _check_meta(ckpt)
    if not is_sharded(meta):
        raise UserError(f"checkpoint {ckpt} is a single-file checkpoint; load it with "
                        f"load_checkpoint into an unsharded model")
    weights, aliases = _sharded_model_state(model)
    _check_against_file(ckpt, ckpt / SHARDED_MODEL, weights, "model")
    tensors = None
    if optimizer is not None:
        if meta.get("optimizer") is None:
            raise UserError(f"checkpoint {ckpt} was saved without optimizer state, so it cannot "
                            f"resume training; start a new run from its weights instead")
        # creates the state tensors of a fresh optimizer, as DTensors shaped like this rank's
        tensors, _ = _split_optimizer(get_optimizer_state_dict(model, optimizer))
        _check_against_file(ckpt, ckpt / SHARDED_OPTIMIZER, tensors, "optimizer")
    rng_tensors, rng_info = _load_tensors(ckpt / RNG_FILE)
    dcp.load(weights, storage_reader=HuggingFaceStorageReader(str(ckpt / SHARDED_MODEL)))
    for alias, canonical in aliases.items():
        weights[alias] = weights[canonical]
    set_model_state_dict(model, weights)
    if optimizer is not None:
        assert tensors is not None
        dcp.load(tensors, storage_reader=HuggingFaceStorageReader(str(ckpt / SHARDED_OPTIMIZER)))
        loaded = _named_optimizer_state(ckpt, meta, tensors)
        set_optimizer_state_dict(model, optimizer, loaded)
    if restore_rng:
        _restore_rng(rng_tensors, rng_info)
    extra = {k.removeprefix("extra."): t for k, t in rng_tensors.items() if k.startswith("extra.")}
    return _train_state(meta), extra, meta.get("info", {})


# --------------------------------------------------------------------------- streamed reading


class LazyTensors(Mapping[str, torch.Tensor]):
    """The tensors of one safetensors file written by ``_save_tensors``, read one at a time.

    Loading a base model or resuming under FSDP reads each tensor when it is needed, so no
    process ever holds every tensor of the file at once. Aliases (tied weights) resolve to
    their stored twin.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            with safe_open(str(path), framework="pt") as f:
                self._keys = list(f.keys())
                meta = json.loads((f.metadata() or {}).get(_META_KEY, "{}"))
        except (OSError, SafetensorError, json.JSONDecodeError) as e:
            raise UserError(f"cannot read {path} ({e}); the checkpoint is damaged, pick "
                            "another") from None
        self._aliases: dict[str, str] = meta.get("aliases", {})

    def __getitem__(self, key: str) -> torch.Tensor:
        stored = self._aliases.get(key, key)
        if stored not in self._keys:
            raise KeyError(key)
        with safe_open(str(self.path), framework="pt") as f:
            return f.get_tensor(stored)

    def __iter__(self) -> Iterator[str]:
        return iter([*self._keys, *self._aliases])

    def __len__(self) -> int:
        return len(self._keys) + len(self._aliases)


def checkpoint_weights(path: Path) -> Mapping[str, torch.Tensor]:
    """A checkpoint's model tensors by name, read on demand (a single-file checkpoint) or
    whole (a sharded one: its per-rank slices are joined first)."""
    ckpt = _resolve(path)
    meta = _check_meta(ckpt)
    if is_sharded(meta):
        return _load_weights(ckpt, meta)
    return LazyTensors(ckpt / MODEL_FILE)


def checkpoint_optimizer(path: Path) -> tuple[dict, Mapping[str, torch.Tensor]]:
    """(a single-file checkpoint's optimizer state dict with tensors left as references,
    the tensors read on demand); see ``resolve_ref``."""
    ckpt = _resolve(path)
    meta = _check_meta(ckpt)
    if meta.get("optimizer") is None or is_sharded(meta):
        raise UserError(f"checkpoint {ckpt} holds no single-file optimizer state to resume")
    return meta["optimizer"], LazyTensors(ckpt / OPTIMIZER_FILE)


def resolve_ref(value: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    """A tensor for a tensor reference of ``checkpoint_optimizer``'s state, else the value."""
    if isinstance(value, dict) and set(value) == {_TENSOR_REF}:
        return tensors[value[_TENSOR_REF]]
    return value


def checkpoint_state(path: Path, restore_rng: bool = True) -> tuple[TrainState, dict[str, torch.Tensor], dict]:
    """(train state, extra tensors, info) of a checkpoint, restoring the global RNGs — what
    ``load_checkpoint`` returns, for callers that load the weights themselves."""
    ckpt = _resolve(path)
    meta = _check_meta(ckpt)
    rng_tensors, rng_info = _load_tensors(ckpt / RNG_FILE)
    if restore_rng:
        _restore_rng(rng_tensors, rng_info)
    extra = {k.removeprefix("extra."): t for k, t in rng_tensors.items() if k.startswith("extra.")}
    return _train_state(meta), extra, meta.get("info", {})

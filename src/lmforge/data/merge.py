"""``lmforge data merge``: the K folders of a sliced preparation as one dataset.

Each slice (``data prepare --num_shards K --shard_index i``) is a complete dataset folder. The
merge checks that they belong together (one tokenizer, one split rule, the same sources, every
slice from 0 to K-1 exactly once), then builds a new folder whose shards are hard links to the
slices' files (a copy where the filesystem cannot link), renumbered per split, with one
manifest and one report that add up the slices'. Nothing is re-encoded.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from lmforge.config import ConfigError, UserError
from lmforge.data.loader import TokenDataset
from lmforge.data.prepare import TOKENIZER_FILE, check_sources, check_splits
from lmforge.utils.io import atomic_dir, atomic_write_json

# Report counters that add up over slices.
_SUMMED = ("documents_read", "documents_kept", "empty", "duplicates", "over_long",
           "bad_rows_skipped", "characters", "documents_cut", "near_duplicates",
           "seconds_encoding")
# Manifest fields that must agree between slices.
_SAME = ("format", "version", "dtype", "vocab_size", "eos_id", "split", "cleaning")


@dataclass
class MergeConfig:
    """Options of ``lmforge data merge``."""

    folders: list[str] = field(default_factory=list)
    """The dataset folders to join: the K slices of one `data prepare --num_shards K`."""
    out: str = ""
    """The merged dataset folder."""
    overwrite: bool = False
    """Replace an existing output folder (only once the new one is complete)."""

    def __post_init__(self) -> None:
        if not self.out.strip():
            raise ConfigError("out: give the merged folder, e.g. --out data/all")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _check_together(sets: list[TokenDataset]) -> None:
    """UserError naming the first folder that does not belong with the first one."""
    first = sets[0]
    tok = _sha256(first.tokenizer_path)
    names = [s["name"] for s in first.manifest.get("sources", [])]
    for ds in sets[1:]:
        for key in _SAME:
            if ds.manifest.get(key) != first.manifest.get(key):
                raise UserError(f"{ds.path}: its manifest's '{key}' differs from {first.path}'s; "
                                "merge only slices of one `data prepare` run")
        if _sha256(ds.tokenizer_path) != tok:
            raise UserError(f"{ds.path}: its tokenizer.json differs from {first.path}'s; "
                            "prepare every slice with the same --tokenizer")
        if [s["name"] for s in ds.manifest.get("sources", [])] != names:
            raise UserError(f"{ds.path}: its inputs differ from {first.path}'s; "
                            "prepare every slice with the same inputs in the same order")
    slices = [ds.manifest.get("slice") for ds in sets]
    if any(slices):
        k = (slices[0] or {}).get("num_shards", 1)
        have = sorted((s or {}).get("shard_index", -1) for s in slices)
        if have != list(range(k)) or any((s or {}).get("num_shards") != k for s in slices):
            missing = sorted(set(range(k)) - set(have))
            raise UserError(f"the folders are slices {have} of --num_shards {k}; each of "
                            f"0..{k - 1} is needed once (missing: {missing or 'none'}, "
                            "or one given twice)")


def _link(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another filesystem, or links not allowed: copy
        shutil.copyfile(src, dst)


def _merge_shards(sets: list[TokenDataset], tmp: Path) -> tuple[dict, list[dict]]:
    """Link every shard into ``tmp`` renumbered; the merged splits and sources."""
    splits: dict[str, dict[str, Any]] = {}
    sources: dict[str, dict[str, Any]] = {}
    for ds in sets:
        renamed: dict[str, str] = {}
        for split, v in ds.manifest["splits"].items():
            out = splits.setdefault(split, {"shards": [], "tokens": 0, "bytes": 0})
            for shard in v["shards"]:
                name = f"{split}_{len(out['shards']):06d}.bin"
                _link(ds.path / shard["file"], tmp / name)
                renamed[shard["file"]] = name
                out["shards"].append({"file": name, "tokens": shard["tokens"]})
            out["tokens"] += v["tokens"]
            out["bytes"] += v["bytes"]
        for src in ds.manifest.get("sources", []):
            m = sources.setdefault(src["name"], {
                "name": src["name"], "weight": src.get("weight"),
                "shards": {s: [] for s in src["shards"]},
                "tokens": dict.fromkeys(src["tokens"], 0), "bytes": dict.fromkeys(src["bytes"], 0),
            })
            for split in src["shards"]:
                m["shards"][split] += [renamed[f] for f in src["shards"][split]]
                m["tokens"][split] += src["tokens"][split]
                m["bytes"][split] += src["bytes"][split]
    return splits, list(sources.values())


def _reports(sets: list[TokenDataset]) -> Iterator[dict[str, Any]]:
    for ds in sets:
        f = ds.path / "report.json"
        yield json.loads(f.read_text(encoding="utf-8")) if f.is_file() else {}


def _merged_report(sets: list[TokenDataset], splits: dict, sources: list[dict]) -> dict:
    reports = list(_reports(sets))
    out: dict[str, Any] = {k: sum(r.get(k, 0) for r in reports) for k in _SUMMED}
    out["near_dup_examples"] = [e for r in reports for e in r.get("near_dup_examples", [])][:5]
    out["tokens"] = {s: v["tokens"] for s, v in splits.items()}
    out["bytes"] = {s: v["bytes"] for s, v in splits.items()}
    total = sum(out["tokens"].values())
    out["token_fraction"] = {s: round(n / total, 5) for s, n in out["tokens"].items()}
    out["sources"] = [{"name": s["name"], "weight": s["weight"], "tokens": s["tokens"]}
                      for s in sources]
    out["merged_from"] = [str(ds.path) for ds in sets]
    return out


def merge(cfg: MergeConfig, console: Console | None = None) -> Path:
    """Join ``cfg.folders`` into ``cfg.out``; return its path."""
    console = console if console is not None else Console()
    if not cfg.folders:
        raise UserError("no folders given; pass the slice folders to merge")
    out = Path(cfg.out).expanduser()
    if out.exists() and not cfg.overwrite:
        raise UserError(f"output folder {out} already exists; pass --overwrite true to replace "
                        "it or choose another --out")
    sets = [TokenDataset.open(f) for f in cfg.folders]
    _check_together(sets)
    with atomic_dir(out, overwrite=cfg.overwrite) as tmp:
        splits, sources = _merge_shards(sets, tmp)
        check_splits(splits, int(sets[0].manifest["split"].get("split_chars", 0)))
        check_sources(sources, [s.get("weight") for s in sources])
        shutil.copyfile(sets[0].tokenizer_path, tmp / TOKENIZER_FILE)
        manifest = {k: v for k, v in sets[0].manifest.items() if k not in ("slice",)}
        manifest.update(splits=splits, sources=sources,
                        merged_from=[str(ds.path) for ds in sets])
        atomic_write_json(tmp / "manifest.json", manifest)
        report = _merged_report(sets, splits, sources)
        atomic_write_json(tmp / "report.json", report)
    tokens = ", ".join(f"{s} {n:,}" for s, n in report["tokens"].items())
    console.print(f"merged {len(sets)} folders ({tokens} tokens) into {out}")
    return out

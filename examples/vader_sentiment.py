"""Build a binary sentiment dataset from the human-rated movie-review snippets of VADER.

    python examples/vader_sentiment.py --out data/vader
    -> data/vader/{train,val,test}.jsonl, rows {"text": ..., "label": "negative"|"positive"}

Source: the *sdist* of vaderSentiment==3.3.2 on PyPI (the wheel lacks the data), fetched with
`pip download` into a cache folder and checked against a pinned sha256:
additional_resources/hutto_ICWSM_2014.tar.gz -> hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt
(Hutto & Gilbert, ICWSM 2014; MIT licence). Each line is `id<TAB>mean rating<TAB>text`: the mean
of 20 human ratings on -4..4, CRLF line ends, UTF-8 (a few names with accents: "Almodóvar").

Label = positive if the rating > 0, else negative; ratings with |r| < 0.5 (near-neutral, the
raters disagreed) are dropped, and so is a repeated text (it would leak across splits); HTML
entities ("&amp;") are unescaped. That leaves 10,070 snippets, about half positive; a seeded
shuffle splits them 80/10/10.
Needs only the standard library and lmforge (for its atomic file writes).
"""

from __future__ import annotations

import argparse
import hashlib
import html
import io
import json
import random
import subprocess
import sys
import tarfile
from pathlib import Path

from lmforge.utils.io import atomic_write_text

PACKAGE = "vadersentiment==3.3.2"
SDIST = "vaderSentiment-3.3.2.tar.gz"
SDIST_SHA256 = "5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9"
INNER_TAR = "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz"
MEMBER = "hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt"
MEMBER_SHA256 = "c8293b0d942e90e223ea2c0955d969040d1a1be514a978b9af0698940bd13350"
NEUTRAL = 0.5  # |rating| below this is dropped


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def fetch_sdist(cache: Path) -> bytes:
    """The pinned sdist's bytes: from the cache, else `pip download`; checked by sha256."""
    path = cache / SDIST
    if not path.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               PACKAGE, "-d", str(cache)]
        print("fetching:", " ".join(cmd), file=sys.stderr)
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    data = path.read_bytes()
    if _sha256(data) != SDIST_SHA256:
        raise SystemExit(f"{path}: sha256 {_sha256(data)} is not the pinned {SDIST_SHA256}; "
                         "delete it and run again")
    return data


def ground_truth(sdist: bytes) -> str:
    """The movie-review ground-truth file's text, from the tarball inside the sdist."""
    with tarfile.open(fileobj=io.BytesIO(sdist), mode="r:gz") as outer:
        inner = outer.extractfile(INNER_TAR)
        assert inner is not None, INNER_TAR
        with tarfile.open(fileobj=io.BytesIO(inner.read()), mode="r:gz") as tar:
            member = tar.extractfile(MEMBER)
            assert member is not None, MEMBER
            raw = member.read()
    if _sha256(raw) != MEMBER_SHA256:
        raise SystemExit(f"{MEMBER}: unexpected sha256 {_sha256(raw)}")
    return raw.decode("utf-8")


def labeled_rows(text: str) -> list[dict[str, str]]:
    """{"text", "label"} rows: near-neutral ratings and repeated texts dropped, file order."""
    rows, seen = [], set()
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) != 3:
            raise SystemExit(f"{MEMBER}:{n}: expected id<TAB>rating<TAB>text")
        rating, snippet = float(parts[1]), html.unescape(parts[2]).strip()  # "&amp;" -> "&"
        if abs(rating) < NEUTRAL or snippet in seen:
            continue
        seen.add(snippet)
        rows.append({"text": snippet, "label": "positive" if rating > 0 else "negative"})
    return rows


def split(rows: list[dict[str, str]], seed: int,
          fractions: tuple[float, float]) -> dict[str, list[dict[str, str]]]:
    """A seeded shuffle cut into train / val / test (val and test get the given fractions)."""
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_val, n_test = (int(len(rows) * f) for f in fractions)
    picked = [rows[i] for i in order]
    return {"test": picked[:n_test], "val": picked[n_test: n_test + n_val],
            "train": picked[n_test + n_val:]}


def write_jsonl(path: Path, rows: list[dict[str, str]]) -> None:
    """Atomically (lmforge's temp file + fsync + rename)."""
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="data/vader", help="folder for train/val/test.jsonl")
    p.add_argument("--cache", default=str(Path.home() / ".cache" / "lmforge" / "vader"),
                   help="where the downloaded sdist is kept")
    p.add_argument("--seed", type=int, default=0, help="seed of the shuffle before the split")
    p.add_argument("--val", type=float, default=0.1, help="share of rows for val.jsonl")
    p.add_argument("--test", type=float, default=0.1, help="share of rows for test.jsonl")
    args = p.parse_args()
    rows = labeled_rows(ground_truth(fetch_sdist(Path(args.cache).expanduser())))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, part in split(rows, args.seed, (args.val, args.test)).items():
        write_jsonl(out / f"{name}.jsonl", part)
        pos = sum(r["label"] == "positive" for r in part)
        print(f"{out / name}.jsonl: {len(part):,} rows, {pos / max(len(part), 1):.1%} positive")
    return 0


if __name__ == "__main__":
    sys.exit(main())

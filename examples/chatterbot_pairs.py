"""Build question/answer fine-tuning rows from the trivia conversations of chatterbot-corpus.

    python examples/chatterbot_pairs.py --out data/trivia
    -> data/trivia/train.jsonl (200 rows) and data/trivia/test.jsonl (40 rows),
       rows {"prompt": question, "completion": answer}

Source: the wheel of chatterbot-corpus==1.3.3 on PyPI (BSD-3), fetched with `pip download` into
a cache folder and checked against a pinned sha256; nothing is installed.
`chatterbot_corpus/data/english/trivia.yml` holds `conversations:`, lists of turns; every two
adjacent turns make one (prompt, reply) pair. One entry of the file is malformed (a bare string,
not a list of turns) and is skipped, as are empty turns and repeated pairs: 260 pairs remain.
A seeded shuffle gives the first --train rows to train.jsonl and the next --test to test.jsonl
(disjoint; the rest is unused). Standard library and PyYAML only.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import random
import subprocess
import sys
import zipfile
from pathlib import Path

import yaml

from lmforge.utils.io import atomic_write_text

PACKAGE = "chatterbot-corpus==1.3.3"
WHEEL = "chatterbot_corpus-1.3.3-py2.py3-none-any.whl"
WHEEL_SHA256 = "86de5300afb9a80826386339d3bec79c0a72eb0358abb8327e2ecef5ae0ce154"
MEMBER = "chatterbot_corpus/data/english/trivia.yml"
MEMBER_SHA256 = "3a9de77e6d82803d1ea3eba48cf6543c884908f4c4f50501fed69f88112994dc"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def fetch_wheel(cache: Path) -> Path:
    """The pinned wheel: from the cache, else `pip download`; checked by sha256."""
    path = cache / WHEEL
    if not path.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
               PACKAGE, "-d", str(cache)]
        print("fetching:", " ".join(cmd), file=sys.stderr)
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    digest = _sha256(path.read_bytes())
    if digest != WHEEL_SHA256:
        raise SystemExit(f"{path}: sha256 {digest} is not the pinned {WHEEL_SHA256}; "
                         "delete it and run again")
    return path


def trivia_pairs(wheel: Path) -> list[dict[str, str]]:
    """{"prompt", "completion"} rows from adjacent turns, in file order, without repeats."""
    with zipfile.ZipFile(wheel) as z:
        raw = z.read(MEMBER)
    if _sha256(raw) != MEMBER_SHA256:
        raise SystemExit(f"{MEMBER}: unexpected sha256 {_sha256(raw)}")
    conversations = yaml.safe_load(raw.decode("utf-8"))["conversations"]
    rows, seen = [], set()
    for turns in conversations:
        if not isinstance(turns, list):  # the one malformed entry: a question with no answer
            continue
        texts = [str(t).strip() for t in turns]  # YAML reads '1963' as a string, 1963 as an int
        for prompt, reply in itertools.pairwise(texts):
            if prompt and reply and (prompt, reply) not in seen:
                seen.add((prompt, reply))
                rows.append({"prompt": prompt, "completion": reply})
    return rows


def write_jsonl(path: Path, rows: list[dict[str, str]]) -> None:
    """Atomically (lmforge's temp file + fsync + rename)."""
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="data/trivia", help="folder for train.jsonl and test.jsonl")
    p.add_argument("--cache", default=str(Path.home() / ".cache" / "lmforge" / "chatterbot"),
                   help="where the downloaded wheel is kept")
    p.add_argument("--seed", type=int, default=0, help="seed of the shuffle before the split")
    p.add_argument("--train", type=int, default=200, help="rows for train.jsonl")
    p.add_argument("--test", type=int, default=40, help="rows for test.jsonl")
    args = p.parse_args()
    rows = trivia_pairs(fetch_wheel(Path(args.cache).expanduser()))
    if args.train + args.test > len(rows):
        raise SystemExit(f"--train {args.train} + --test {args.test} > the {len(rows)} pairs")
    random.Random(args.seed).shuffle(rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    parts = {"train": rows[: args.train], "test": rows[args.train: args.train + args.test]}
    for name, part in parts.items():
        write_jsonl(out / f"{name}.jsonl", part)
        print(f"{out / name}.jsonl: {len(part)} rows")
    print(f"({len(rows)} pairs in {MEMBER}; {len(rows) - args.train - args.test} unused)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

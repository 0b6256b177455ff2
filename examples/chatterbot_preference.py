"""Preference pairs from the trivia of chatterbot-corpus: chosen = the true reply, rejected =
the reply to another question of the same split.

    python examples/chatterbot_preference.py --out data/trivia-pref
    -> data/trivia-pref/train.jsonl (200 pairs) and data/trivia-pref/test.jsonl (60 pairs),
       rows {"prompt": question, "chosen": its answer, "rejected": another question's answer}

The (question, answer) rows are those of `chatterbot_pairs.py` (the pinned wheel, 260 pairs),
shuffled with --seed and split into disjoint train and test questions. Within each split the
rejected replies are the chosen ones rotated by a random offset (never the row's own answer,
and never an identical string), so every answer is chosen once and rejected once: a model can
only tell them apart by whether the reply fits the question, not by which replies are likely.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

from chatterbot_pairs import fetch_wheel, trivia_pairs, write_jsonl


def pairs(rows: list[dict[str, str]], rng: random.Random) -> list[dict[str, str]]:
    """Each row's answer as chosen and another row's (different) answer as rejected."""
    n = len(rows)
    while True:
        shift = rng.randrange(1, n)
        out = [{"prompt": r["prompt"], "chosen": r["completion"],
                "rejected": rows[(i + shift) % n]["completion"]} for i, r in enumerate(rows)]
        if all(p["chosen"].strip() != p["rejected"].strip() for p in out):
            return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="data/trivia-pref", help="folder for train.jsonl, test.jsonl")
    p.add_argument("--cache", default=str(Path.home() / ".cache" / "lmforge" / "chatterbot"),
                   help="where the downloaded wheel is kept")
    p.add_argument("--seed", type=int, default=0, help="seed of the shuffle and the rotation")
    p.add_argument("--train", type=int, default=200, help="pairs for train.jsonl")
    p.add_argument("--test", type=int, default=60, help="pairs for test.jsonl")
    args = p.parse_args()
    rows = trivia_pairs(fetch_wheel(Path(args.cache).expanduser()))
    if args.train + args.test > len(rows):
        raise SystemExit(f"--train {args.train} + --test {args.test} > the {len(rows)} pairs")
    rng = random.Random(args.seed)
    rng.shuffle(rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    splits = {"train": rows[: args.train], "test": rows[args.train: args.train + args.test]}
    for name, part in splits.items():
        write_jsonl(out / f"{name}.jsonl", pairs(part, rng))
        print(f"{out / name}.jsonl: {len(part)} pairs")
    return 0


if __name__ == "__main__":
    sys.exit(main())

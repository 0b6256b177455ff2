"""Data preparation: tokenizer training and encoding, each against `tokenizers` doing the same.

The input is JSONL made of CPython's documentation topics (``pydoc_data.topics``, offline)
repeated with a unique header line per copy, so de-duplication keeps every document. Each
run is a fresh `lmforge data prepare` subprocess (train a 4,096-token BPE, encode, write
shards); it reports the seconds of its two passes apart in report.json (``seconds_tokenizer``:
read + clean + dedup + ``train_from_iterator``; ``seconds_encoding``: read + clean + dedup +
split + ``encode_batch_fast`` + write). Its peak RSS is read with ``getrusage(RUSAGE_CHILDREN)`` in
a small wrapper process that runs nothing else. The peer is the bare ``tokenizers`` pipeline a
user would write by hand on the same file, timed the same two ways: stream it into the same
byte-level BPE trainer (``train_from_iterator``), then stream it again through
``encode_batch_fast`` (``encode_batch`` without character offsets, the library's fastest
batch encoder) and append uint16 ids to one file; no cleaning, dedup, split or report.

    python benchmarks/data_prepare.py [--sizes 10,100] [--repeats 2] [--encoding_only]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from common import Section

from lmforge.data.corpora import pydoc_topics_text

# Runs a command and prints its wall time and the peak RSS of its process tree (KiB on Linux).
WRAPPER = """
import json, resource, subprocess, sys, time
t0 = time.perf_counter()
p = subprocess.run(sys.argv[1:], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
dt = time.perf_counter() - t0
last = (p.stdout.strip().splitlines() or ["null"])[-1]
try:
    child = json.loads(last)
except ValueError:
    child = None
print(json.dumps({"rc": p.returncode, "seconds": dt, "child_stdout": child,
                  "maxrss_kib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))
"""

# The hand-written peer: the same tokenizer training and encoding, nothing else, timed apart.
PEER = """
import json, sys, time
import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
src, out = sys.argv[1], sys.argv[2]
def texts():
    with open(src, encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)["text"]
def trained(lines):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=4096, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(lines, trainer=trainer)
    return tok
t0 = time.perf_counter()
if len(sys.argv) > 3:  # encoding only, with a given tokenizer
    tok = Tokenizer.from_file(sys.argv[3])
else:
    tok = trained(texts())
t1 = time.perf_counter()
eos = tok.token_to_id("<|endoftext|>")
encode = getattr(tok, "encode_batch_fast", tok.encode_batch)  # no offsets: the fastest path
with open(out, "wb") as f:
    batch = []
    for text in texts():
        batch.append(text)
        if len(batch) == 1000:
            for enc in encode(batch):
                np.asarray(enc.ids + [eos], dtype=np.uint16).tofile(f)
            batch = []
    for enc in encode(batch):
        np.asarray(enc.ids + [eos], dtype=np.uint16).tofile(f)
t2 = time.perf_counter()
print(json.dumps({"seconds_tokenizer": t1 - t0 if len(sys.argv) <= 3 else None,
                  "seconds_encoding": t2 - t1}))
"""


def make_corpus(path: Path, megabytes: float) -> int:
    """Write ~``megabytes`` MB of JSONL documents with unique first lines; return its bytes."""
    topics = sorted(pydoc_topics_text().items())
    target, written, copy = megabytes * 1e6, 0, 0
    with open(path, "w", encoding="utf-8") as f:
        while written < target:
            for name, text in topics:
                line = json.dumps({"text": f"{name} (copy {copy})\n{text}"}) + "\n"
                f.write(line)
                written += len(line.encode("utf-8"))
            copy += 1
    return path.stat().st_size


def measured(cmd: list[str], phases: Path | None = None) -> dict:
    """Wall seconds, the two phases' seconds and peak RSS (bytes) of ``cmd`` (under the wrapper).

    The phases come from ``phases`` (lmforge's report.json) or else from the command's last
    stdout line (the peer's JSON).
    """
    proc = subprocess.run([sys.executable, "-c", WRAPPER, *cmd], capture_output=True,
                          text=True, check=True)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if result["rc"] != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])}... failed with exit code {result['rc']}")
    return {"seconds": result["seconds"], "peak_rss": result["maxrss_kib"] * 1024,
            **_phases(phases, result)}


def _phases(report: Path | None, result: dict) -> dict:
    if report is not None:
        r = json.loads(report.read_text())
    else:
        r = result["child_stdout"]
    return {"tokenizer": r.get("seconds_tokenizer") or float("nan"),
            "encoding": r["seconds_encoding"]}


def measure(megabytes: float, work: Path, repeats: int, encoding_only: bool = False) -> dict:
    """lmforge and the peer on one corpus size, alternated; the best of ``repeats`` each.

    The best (not the median) of a few, per phase: a shared machine's load only ever slows
    a run down. ``encoding_only``: both encode with one tokenizer trained beforehand (by
    ``tokenizers`` on the first 20 MB), so a long run times the encoding pass alone.
    """
    src = work / f"corpus_{megabytes:g}mb.jsonl"
    size = make_corpus(src, megabytes)
    out, peer_out = work / f"out_{megabytes:g}", work / f"peer_{megabytes:g}.bin"
    cmds = {
        "lmforge": [sys.executable, "-m", "lmforge.cli", "data", "prepare", str(src), "--out",
                    str(out), "--vocab_size", "4096", "--overwrite", "true"],
        "peer": [sys.executable, "-c", PEER, str(src), str(peer_out)],
    }
    if encoding_only:
        tok = work / "tokenizer.json"
        if not tok.exists():
            sample = work / "sample_20mb.jsonl"
            make_corpus(sample, 20)
            code = PEER.split("t0 = time.perf_counter()")[0] + "trained(texts()).save(sys.argv[3])"
            subprocess.run([sys.executable, "-c", code, str(sample), "-", str(tok)], check=True)
        cmds["lmforge"][-4:-2] = ["--tokenizer", str(tok)]
        cmds["peer"].append(str(tok))
    reports = {"lmforge": out / "report.json", "peer": None}
    runs: dict[str, list[dict]] = {name: [] for name in cmds}
    for _ in range(repeats):
        for name, cmd in cmds.items():
            runs[name].append(measured(cmd, reports[name]))
    best = {name: {k: min(x[k] for x in r) for k in r[0]} for name, r in runs.items()}
    return {"megabytes": size / 1e6, **best}


def run(
    sizes: tuple[float, ...] = (10, 100), repeats: int = 2, encoding_only: bool = False
) -> Section:
    """The RESULTS.md section."""
    section = Section(
        title="Data preparation: `lmforge data prepare` vs the `tokenizers` library",
        method=("JSONL of `pydoc_data.topics` documents repeated with unique header lines; "
                "train a 4,096-token byte-level BPE, then encode and write shards; each run a "
                "fresh subprocess, peak RSS from `getrusage(RUSAGE_CHILDREN)`. Tokenizer "
                "training: lmforge's first pass (read, clean, dedup, `train_from_iterator`) "
                "against `tokenizers`' `train_from_iterator` on the same file; encoding: "
                "lmforge's second pass (read, clean, dedup, per-document split, "
                "`encode_batch_fast`, write) against `encode_batch_fast` + write of the same "
                f"file. MB = 10^6 bytes of input. The two alternate, {repeats} runs each; the fastest of each phase is "
                "shown (load only ever slows a run)."
                + (" This run: encoding only, both sides given one tokenizer trained on 20 MB "
                   "of the same corpus beforehand (`--encoding_only`)." if encoding_only else "")),
        columns=["input", "training MB/s: lmforge", "`train_from_iterator`", "ratio",
                 "encoding MB/s: lmforge", "`encode_batch_fast`", "ratio", "lmforge peak RSS",
                 "peer peak RSS", "lmforge RSS vs smallest input"],
    )
    results = []
    with tempfile.TemporaryDirectory(prefix="lmforge-bench-data-") as tmp:
        for mb in sizes:
            results.append(measure(mb, Path(tmp), repeats, encoding_only))
    base_rss = results[0]["lmforge"]["peak_rss"]
    for r in results:
        ours, peer, mb = r["lmforge"], r["peer"], r["megabytes"]
        row = [f"{mb:.1f} MB"]
        for phase in ("tokenizer", "encoding"):
            if encoding_only and phase == "tokenizer":
                row += ["-", "-", "-"]
                continue
            a, b = mb / ours[phase], mb / peer[phase]
            row += [f"{a:.2f}", f"{b:.2f}", f"**{a / b:.2f}**"]
        row += [f"{ours['peak_rss'] / 2**20:.0f} MiB", f"{peer['peak_rss'] / 2**20:.0f} MiB",
                f"{ours['peak_rss'] / base_rss:.2f}x"]
        section.rows.append(row)
    return section


def main() -> None:
    """Command line: print the section."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="10,100", help="input sizes in MB, comma-separated")
    ap.add_argument("--repeats", type=int, default=2, help="runs of each, the best kept")
    ap.add_argument("--encoding_only", action="store_true",
                    help="time the encoding pass alone, both sides given one tokenizer trained "
                         "on 20 MB first (default: off, train and encode)")
    args = ap.parse_args()
    sizes = tuple(float(s) for s in args.sizes.split(","))
    print(run(sizes, args.repeats, args.encoding_only).markdown())


if __name__ == "__main__":
    main()

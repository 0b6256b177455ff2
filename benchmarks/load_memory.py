"""Peak memory of an unquantized load: ``load_run(run, "cpu", "fp32")`` in a fresh process.

The peak is VmHWM over the load alone (reset through ``/proc/self/clear_refs`` after the
imports), less the RSS after the imports, as a multiple of the model's weight bytes. A load
that streams each tensor from the checkpoint into a model built on the meta device peaks near
1x; one that reads the whole file and then copies it into an allocated model, near 2x.
``--baseline_src`` runs the same worker on another source tree (e.g. ``git archive`` of an
older commit), alternating with this one, so both are measured in the same run.

    python benchmarks/load_memory.py                                  # llama-6m (random init)
    python benchmarks/load_memory.py --run /tmp/smollm2 --baseline_src /tmp/before/src
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from common import Section, fmt_mib, load_average, median

HERE = Path(__file__).resolve().parent


def _status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")


def micro_run(root: Path, like: Path) -> Path:
    """A 1-layer, width-32 decoder run with ``like``'s tokenizer: loading it first does the
    loader's one-time work (lazy imports, meta-device kernels: ~100 MiB of RSS) outside the
    measured load."""
    import shutil

    import yaml

    from lmforge.checkpoint import TrainState, save_checkpoint
    from lmforge.config import to_dict
    from lmforge.models.decoder import Decoder, DecoderConfig
    from lmforge.run import read_run_spec

    spec = read_run_spec(like)
    assert isinstance(spec.model_cfg, DecoderConfig)
    cfg = DecoderConfig(vocab_size=spec.model_cfg.vocab_size, block_size=64, n_layer=1,
                        n_head=2, n_embd=32)
    run = root / "micro"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"model": to_dict(cfg),
                                                     "eos_id": spec.eos_id}))
    shutil.copy(spec.tokenizer, run / "tokenizer.json")
    save_checkpoint(run, TrainState(step=0), Decoder(cfg), None)
    return run


def worker(run: str, warmup: str) -> dict:
    """Load ``run`` in this fresh process, after ``warmup``; the memory it took."""
    import torch

    from lmforge.run import load_run

    torch.set_num_threads(1)
    load_run(warmup, "cpu", "fp32")
    imported = _status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := the current RSS
    model = load_run(run, "cpu", "fp32").model
    peak, after = _status_kib("VmHWM"), _status_kib("VmRSS")
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in [*model.parameters(), *model.buffers()]}
    return {"imported": imported * 1024, "peak": peak * 1024, "after": after * 1024,
            "weights": sum(storages.values())}


def _in_subprocess(run: str, warmup: Path, src: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(src), str(HERE)])}
    proc = subprocess.run([sys.executable, __file__, "--worker", run, str(warmup)],
                          capture_output=True,
                          text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"worker on {run} failed\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run(smollm2: str | None, baseline_src: str | None, repeats: int) -> Section:
    """The table: each run, loaded by this tree (and the baseline tree), ``repeats`` times."""
    from generation import tiny_run

    trees = {"this tree": HERE.parent / "src"}
    if baseline_src:
        trees = {"baseline": Path(baseline_src), **trees}
    section = Section(
        "Unquantized load: peak memory, fp32 on CPU",
        "`load_run(run, \"cpu\", \"fp32\")` in a fresh process per load: peak = VmHWM over the "
        "load (reset through `/proc/self/clear_refs` after the imports and a first load of a "
        "1-layer model, which does the loader's one-time work) less the RSS before it; "
        f"median of {repeats} processes per tree, trees alternating.",
        ["model", "tree", "weights", "peak over imports", "peak / weights",
         "RSS after load over before"])
    before = load_average()
    with tempfile.TemporaryDirectory() as tmp:
        runs = [("llama-6m (random init)", str(tiny_run(Path(tmp))))]
        if smollm2:
            runs.append(("SmolLM2-135M (imported)", smollm2))
        for name, path in runs:
            warmup = micro_run(Path(tempfile.mkdtemp(dir=tmp)), Path(path))
            got: dict[str, list[dict]] = {t: [] for t in trees}
            for _ in range(repeats):
                for tree, src in trees.items():
                    got[tree].append(_in_subprocess(path, warmup, src))
            for tree, results in got.items():
                weights = results[0]["weights"]
                peak = median([r["peak"] - r["imported"] for r in results])
                after = median([r["after"] - r["imported"] for r in results])
                section.rows.append([name, tree, fmt_mib(weights), fmt_mib(peak),
                                     f"**{peak / weights:.2f}x**", fmt_mib(after)])
                print(" | ".join(section.rows[-1]), flush=True)
    section.notes.append(f"load average (1/5/15 min) {before} before, {load_average()} after")
    return section


def main() -> None:
    """Print the table as markdown (or, with --worker, one load's numbers as JSON)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default=None, help="an imported SmolLM2 run folder to add")
    ap.add_argument("--baseline_src", default=None, help="another tree's src/ to compare with")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--worker", nargs=2, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker)))
        return
    print(run(args.run, args.baseline_src, args.repeats).markdown())


if __name__ == "__main__":
    main()

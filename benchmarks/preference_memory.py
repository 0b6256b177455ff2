"""LoRA DPO against LoRA SFT: peak memory of `lmforge finetune` on the same model, on CPU.

DPO needs the frozen reference's log-probs of every reply. With LoRA, lmforge takes them from
the policy itself with its adapters switched off, so no second model should exist: the peak
of a DPO run should be the peak of an SFT run over the same rows, not that plus a model.

A base run is pretrained for one step (8 layers of width 512, vocab 512, as
benchmarks/qlora_memory.py), then each fine-tune runs 3 steps in a fresh process on the same
sequences: SFT with batch 2B over rows prompt + chosen and prompt + rejected, DPO with batch B
over the pairs (B chosen + B rejected rows per step, and a no-grad reference forward).
Reported: the peak RSS (VmHWM, reset after imports) before the first checkpoint write, less
the RSS after imports, and `storage_bytes` of the model — what a frozen copy would add.

    python benchmarks/preference_memory.py
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from common import Section, base_run, fmt_mib

MODEL = ["--model.n_layer", "8", "--model.n_embd", "512", "--model.n_head", "8",
         "--model.block_size", "128"]
PAIRS, STEPS, MAX_LEN = 4, 3, 96
COMMON = ["--train.max_steps", str(STEPS), "--max_len", str(MAX_LEN), "--val_fraction", "0",
          "--train.threads", "2", "--optim.warmup_steps", "1", "--method", "lora"]
RUNS = {"LoRA SFT": ["--task", "chat", "--data", "sft.jsonl", "--train.batch_size",
                     str(2 * PAIRS)],
        "LoRA DPO": ["--task", "dpo", "--data", "pref.jsonl", "--train.batch_size", str(PAIRS)]}
ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}  # RSS follows live tensors (see qlora_memory.py)


def prepare(root: Path) -> None:
    """Corpus, tokenizer, a one-step base run, and the same replies as SFT rows and as pairs."""
    base_run(root, MODEL)
    pairs = [{"prompt": f"what is {a} plus {b}?", "chosen": f"{a} plus {b} makes {a + b}",
              "rejected": f"{a} plus {b} makes {a + b + 1}"} for a in range(10) for b in range(8)]
    sft = [{"prompt": p["prompt"], "completion": p[k]} for p in pairs
           for k in ("chosen", "rejected")]
    for name, rows in (("pref.jsonl", pairs), ("sft.jsonl", sft)):
        (root / name).write_text("".join(json.dumps(r) + "\n" for r in rows))


def _status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")


def worker(root: Path, label: str) -> dict:
    """One fine-tuning run in this fresh process; its memory in bytes."""
    import lmforge.finetuning.chat as chat
    from lmforge import cli

    os.chdir(root)
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := the current RSS
    base = _status_kib("VmRSS")
    seen: dict[str, int] = {}
    save = chat.save_resumable

    def first_save_marks_the_training_peak(*args: object, **kwargs: object) -> None:
        seen.setdefault("training", _status_kib("VmHWM"))
        save(*args, **kwargs)  # type: ignore[arg-type]

    chat.save_resumable = first_save_marks_the_training_peak  # type: ignore[assignment]
    out = label.lower().replace(" ", "-")
    assert cli.run(["finetune", "--run", "runs/base", "--out", out, "--overwrite", *COMMON,
                    *RUNS[label]]) == 0
    summary = json.loads((root / "runs" / out / "summary.json").read_text())
    return {"baseline": base * 1024, "training": (seen["training"] - base) * 1024,
            "model_bytes": summary["model_bytes"], "params": summary["params"]}


def _in_subprocess(root: Path, label: str) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--worker", label, "--root", str(root)],
                          capture_output=True, text=True, check=True, env={**os.environ, **ENV})
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run() -> Section:
    """The RESULTS.md section."""
    section = Section(
        title="LoRA DPO vs LoRA SFT: peak memory of `lmforge finetune`, fp32 on CPU",
        method=(f"The same one-step base run (8 x 512, vocab 512) fine-tuned with LoRA for "
                f"{STEPS} steps in a fresh process each, over the same sequences: SFT with "
                f"{2 * PAIRS} rows per step (prompt + chosen, prompt + rejected), DPO with "
                f"{PAIRS} pairs per step (the same {2 * PAIRS} rows, plus the reference forward "
                "with adapters off). Peak RSS (VmHWM, reset after imports) before the first "
                "checkpoint write, less the RSS after imports, `MALLOC_MMAP_THRESHOLD_=65536`."),
        columns=["run", "model (storage_bytes)", "training peak", "peak - SFT peak",
                 "(peak - SFT peak) / model"])
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        prepare(root)
        got = {label: _in_subprocess(root, label) for label in RUNS}
    sft = got["LoRA SFT"]["training"]
    for label, m in got.items():
        extra = m["training"] - sft
        section.rows.append([label, fmt_mib(m["model_bytes"]), fmt_mib(m["training"]),
                             fmt_mib(extra), f"{extra / m['model_bytes']:.2f}"])
    section.notes.append(f"model: {got['LoRA DPO']['params'] / 1e6:.1f}M parameters; a frozen "
                         "reference copy would add about one `model` to the DPO peak (ratio 1)")
    return section


def main() -> None:
    """Command line: print the section, or run one fine-tuning (internal --worker)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--root", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker is not None:
        print(json.dumps(worker(Path(args.root), args.worker)))
        return
    print(run().markdown())


if __name__ == "__main__":
    main()

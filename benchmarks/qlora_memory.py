"""QLoRA against LoRA: peak memory of `lmforge finetune` on a ~30M-parameter decoder, on CPU.

A base run is pretrained for one step (8 layers of width 512, vocab 512: its block matrices are
96% of the weights, as in large models), then `lmforge finetune` runs 3 steps of each method in
a fresh process: --method lora, --method qlora (bitsandbytes' NF4 when installed) and
--method qlora --lora.quant_backend torch (the plain-PyTorch fallback). Each process reports:

- baseline: its RSS once torch, lmforge and bitsandbytes are imported (the same for all);
- training peak: the peak RSS (VmHWM) before the first checkpoint is written, less the
  baseline: the model built and filled from the base checkpoint, plus the training steps;
- overall peak: the same at exit, with the checkpoint write: a (Q)LoRA checkpoint holds the
  merged fp32 weights, so saving builds a dequantized fp32 copy of the whole model.

The prediction is `lmforge plan`'s peak for the same model and settings (fp32, AdamW, adapters
on q/k/v/o, micro-batch x max_len). RSS also counts what the plan leaves out: the allocator's
cache, the pages of the base checkpoint read through mmap, the tokenizer and the data.

    python benchmarks/qlora_memory.py
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
FINETUNE = ["--train.max_steps", "3", "--train.batch_size", "2", "--max_len", "96",
            "--val_fraction", "0", "--train.threads", "2", "--optim.warmup_steps", "1"]
BATCH, MAX_LEN = 2, 96
FIXED_MMAP = "`MALLOC_MMAP_THRESHOLD_=65536`"
METHODS = {"lora": ["--method", "lora"],
           "qlora (bitsandbytes)": ["--method", "qlora", "--lora.quant_backend", "bitsandbytes"],
           "qlora (plain PyTorch)": ["--method", "qlora", "--lora.quant_backend", "torch"]}


def prepare(root: Path) -> None:
    """Corpus, tokenizer, a one-step base run and short chat rows."""
    base_run(root, MODEL)
    rows = [{"prompt": f"what is {a} plus {b}?", "completion": f"{a} plus {b} makes {a + b}"}
            for a in range(10) for b in range(8)]
    (root / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def _status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")


def worker(root: Path, label: str) -> dict:
    """One fine-tuning run in this fresh process; its memory in bytes."""
    import lmforge.finetuning.chat as recipe  # where the run calls save_resumable
    import lmforge.models.quant as quant
    from lmforge import cli

    quant.bitsandbytes_available()  # import bitsandbytes in every case: an equal baseline
    os.chdir(root)
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := the current RSS
    base = _status_kib("VmRSS")
    seen: dict[str, int] = {}
    save = recipe.save_resumable

    def first_save_marks_the_training_peak(*args: object, **kwargs: object) -> None:
        seen.setdefault("training", _status_kib("VmHWM"))
        save(*args, **kwargs)  # type: ignore[arg-type]

    recipe.save_resumable = first_save_marks_the_training_peak  # type: ignore[assignment]
    out = "ft-" + label.split()[0] + ("-torch" if "PyTorch" in label else "")
    assert cli.run(["finetune", "--run", "runs/base", "--data", "chat.jsonl", "--out", out,
                    "--overwrite", *FINETUNE, *METHODS[label]]) == 0
    summary = json.loads((root / "runs" / out / "summary.json").read_text())
    return {"baseline": base * 1024, "training": (seen["training"] - base) * 1024,
            "overall": (_status_kib("VmHWM") - base) * 1024, "model_bytes": summary["model_bytes"],
            "nf4": summary.get("nf4")}


def predicted(root: Path, method: str) -> dict:
    """`lmforge plan`'s numbers for the base run's model and the fine-tuning settings."""
    from lmforge.plan import TrainSettings, train_memory
    from lmforge.run import read_run_spec

    cfg = read_run_spec(str(root / "runs" / "base")).model_cfg
    s = TrainSettings(precision="fp32", batch_size=BATCH, seq_len=MAX_LEN, method=method,
                      lora_rank=8, lora_targets="attention")
    return {**train_memory(cfg, s), "cfg": cfg}


def _in_subprocess(root: Path, label: str, env: dict[str, str] | None = None) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--worker", label, "--root", str(root)],
                          capture_output=True, text=True, check=True,
                          env={**os.environ, **(env or {})})
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run() -> Section:
    """The RESULTS.md section."""
    from lmforge.plan import param_counts

    section = Section(
        title="QLoRA vs LoRA: peak memory of `lmforge finetune`, fp32 on CPU",
        method=("Each method fine-tunes the same one-step base run (8 x 512, vocab 512) for 3 "
                f"steps of {BATCH} x {MAX_LEN} tokens in a fresh process; peak RSS (VmHWM, "
                "reset after imports) less the RSS after imports, before the first checkpoint "
                "write (training) and at exit (overall), against `lmforge plan`'s peak. "
                "`model` is `storage_bytes` of the trained model (parameters + NF4 buffers)."),
        columns=["method", "NF4 bits/weight", "model", "plan: weights", "plan: peak",
                 "training peak", "/ plan", f"training peak, {FIXED_MMAP}", "/ plan",
                 "overall peak", f"overall peak, {FIXED_MMAP}"],
        notes=[f"{FIXED_MMAP} stops glibc from raising its mmap threshold after large frees. "
               "Without it the heap keeps what was freed: QLoRA dequantizes each weight twice "
               "per step (forward and backward) and those MiB-sized temporaries stay in RSS, "
               "which hides its saving at this size; with it RSS follows the live tensors."],
    )
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        prepare(root)
        for label in METHODS:
            method = label.split()[0]
            plan = predicted(root, method)
            got = _in_subprocess(root, label)
            fixed = _in_subprocess(root, label, {"MALLOC_MMAP_THRESHOLD_": "65536"})
            nf4 = got["nf4"]
            bits = f"{nf4['bits_per_weight']:.3f} ({nf4['backend']})" if nf4 else "-"
            section.rows.append([
                label, bits, fmt_mib(got["model_bytes"]), fmt_mib(plan["weights"]),
                fmt_mib(plan["peak"]), fmt_mib(got["training"]),
                f"{got['training'] / plan['peak']:.2f}", f"**{fmt_mib(fixed['training'])}**",
                f"{fixed['training'] / plan['peak']:.2f}", fmt_mib(got["overall"]),
                fmt_mib(fixed["overall"])])
        n = param_counts(plan["cfg"])["total"]
        section.notes.append(f"model: {n / 1e6:.1f}M parameters; RSS after imports "
                             f"{fmt_mib(got['baseline'])}")
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

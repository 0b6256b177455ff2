"""Generation with the KV cache against a naive loop that re-runs the whole sequence."""

from __future__ import annotations

import pytest
import torch

from lmforge.config import UserError
from lmforge.infer.generate import DecodeStep, decode_layout, generate, generate_batch
from lmforge.models.decoder import Decoder, DecoderConfig, KVCache


def model_for(**kw: object) -> Decoder:
    # init_std 0.2, larger than usual, spreads the logits so greedy ties cannot occur.
    base: dict[str, object] = dict(
        vocab_size=53, block_size=24, n_layer=2, n_head=4, n_embd=32, init_std=0.2
    )
    base.update(kw)
    model = Decoder(DecoderConfig(**base))  # type: ignore[arg-type]
    model.init_weights(torch.Generator().manual_seed(0))
    return model.eval()


@torch.no_grad()
def naive_greedy(model: Decoder, prompt: list[int], n: int) -> list[int]:
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt) :]


def run(gen: object) -> tuple[list[int], str]:
    """Drain a generate() generator: (tokens, finish reason)."""
    out: list[int] = []

    def drain() -> object:
        return (yield from gen)  # type: ignore[misc]

    it = drain()
    while True:
        try:
            out.append(next(it))
        except StopIteration as stop:
            return out, stop.value


@pytest.mark.parametrize("kw", [{"n_kv_head": 2}, {"pos": "learned", "mlp": "gelu", "bias": True}])
def test_greedy_generate_equals_naive_loop(kw: dict[str, object]) -> None:
    model = model_for(**kw)
    prompt = [5, 17, 3, 40, 9]
    got, reason = run(generate(model, prompt, 12, temperature=0.0))
    assert got == naive_greedy(model, prompt, 12)
    assert reason == "length"


def test_prompt_truncated_from_the_left_to_fit_context() -> None:
    model = model_for()  # block_size 24
    prompt = list(range(1, 31))  # 30 tokens
    got, _ = run(generate(model, prompt, 6, temperature=0.0))
    # prompt + max_new_tokens <= block_size (sampling.fit_prompt): 18 prompt tokens fit.
    assert got == naive_greedy(model, prompt[-18:], 6)


def test_stops_when_context_is_full() -> None:
    model = model_for()
    got, reason = run(generate(model, [1, 2], 100, temperature=0.0))
    assert len(got) == 23  # one prompt token kept + 23 new ones = the 24 positions
    assert reason == "length"
    assert got == naive_greedy(model, [2], 23)


def test_stops_at_eos_without_yielding_it() -> None:
    model = model_for()
    prompt = [7, 8, 9]
    expected = naive_greedy(model, prompt, 8)
    eos = expected[3]
    first = expected.index(eos)
    got, reason = run(generate(model, prompt, 8, temperature=0.0, eos_id=eos))
    assert got == expected[:first]
    assert reason == "stop"


def test_seeded_sampling_is_reproducible() -> None:
    model = model_for()
    a = list(generate(model, [1, 2, 3], 15, temperature=1.0, top_p=0.95, seed=11))
    b = list(generate(model, [1, 2, 3], 15, temperature=1.0, top_p=0.95, seed=11))
    c = list(generate(model, [1, 2, 3], 15, temperature=1.0, top_p=0.95, seed=12))
    assert a == b and len(a) == 15
    assert a != c


def test_inference_mode_does_not_leak_between_yields() -> None:
    model = model_for()
    gen = generate(model, [1, 2], 3, temperature=0.0)
    next(gen)
    assert not torch.is_inference_mode_enabled()
    assert torch.is_grad_enabled()
    gen.close()


def test_cache_allocated_once(monkeypatch: pytest.MonkeyPatch) -> None:
    model = model_for()
    calls: list[tuple[int, int | None]] = []
    original = model.new_cache

    def counting(batch: int, max_len: int | None = None) -> KVCache:
        calls.append((batch, max_len))
        return original(batch, max_len)

    monkeypatch.setattr(model, "new_cache", counting)
    list(generate(model, [1, 2, 3], 10, temperature=0.0))
    assert calls == [(1, 12)]  # 3 prompt + 9 fed-back tokens


def test_misuse_is_rejected() -> None:
    model = model_for()
    with pytest.raises(UserError, match="prompt"):
        list(generate(model, [], 3))
    with pytest.raises(UserError, match="temperature"):
        list(generate(model, [1], 3, temperature=-1.0))
    assert list(generate(model, [1], 0)) == []
    with pytest.raises(ValueError, match=r"model\.eval\(\)"):
        list(generate(model.train(), [1], 3))


def test_generate_batch_equals_single_generation() -> None:
    model = model_for(n_kv_head=1)
    prompts = [[1, 2, 3, 4], [9, 9, 9, 9], [50, 0, 13, 7]]
    singles = [naive_greedy(model, p, 7) for p in prompts]
    assert generate_batch(model, prompts, 7, temperature=0.0) == singles
    eos = singles[0][2]
    cut = generate_batch(model, prompts, 7, temperature=0.0, eos_id=eos)
    assert cut == [s[: s.index(eos)] if eos in s else s for s in singles]
    with pytest.raises(UserError, match="same length"):
        generate_batch(model, [[1, 2], [3]], 2)


def test_compile_failure_falls_back_to_eager_with_one_warning(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    model = model_for(n_kv_head=2)
    eager = list(generate(model, [5, 17, 3], 8, temperature=0.0))

    def broken(*args: object, **kw: object) -> object:
        def fail(*a: object, **k: object) -> object:
            raise RuntimeError("backend exploded\nlong traceback")
        return fail

    monkeypatch.setattr(torch, "compile", broken)
    with caplog.at_level("WARNING", logger="lmforge.infer.generate"):
        got = list(generate(model, [5, 17, 3], 8, temperature=0.0, compile=True))
    assert got == eager
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 1 and "backend exploded" in warned[0] and "eagerly" in warned[0]
    assert "long traceback" not in warned[0]


@pytest.mark.slow
def test_compiled_decode_gives_the_eager_tokens() -> None:
    """torch.compile of the decode step (inductor, a C++ compiler on CPU): same greedy tokens
    as eager, and the step really ran compiled (no silent fallback)."""
    model = model_for(n_kv_head=2)
    prompt = [5, 17, 3, 40]
    eager = list(generate(model, prompt, 10, temperature=0.0))
    cache = model.new_cache(1, 16)
    step = DecodeStep(model, compile=True)
    with torch.inference_mode():
        logits = model(torch.tensor([prompt]), cache, input_pos=torch.arange(4), last=True)
        got, pos = [], torch.tensor([4])
        for _ in range(10):
            got.append(int(logits[0, -1].argmax()))
            logits = step(torch.tensor([[got[-1]]]), cache, pos)[:, None]
            pos += 1
    assert step.compiled and got == eager


@pytest.mark.parametrize("kw", [{"n_kv_head": 2}, {"pos": "learned", "mlp": "gelu", "bias": True,
                                                   "tie_embeddings": False}])
def test_decode_layout_keeps_logits_tokens_and_state_dict(kw: dict[str, object]) -> None:
    """Column-major fp32 weights: the logits of the row-major model to 1e-5, the same greedy
    tokens, and a state dict with the same keys, shapes and values (the checkpoint format)."""
    model, plain = model_for(**kw), model_for(**kw)
    prompt = [5, 17, 3, 40, 9]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = list(model.parameters())
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert decode_layout(model) == len(linears)
    assert all(m.weight.stride() == (1, m.weight.shape[0]) for m in linears)
    assert list(model.parameters()) == params  # the same Parameters: optimizers and ties hold
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)
    with torch.inference_mode():
        idx = torch.tensor([prompt])
        torch.testing.assert_close(model(idx), plain(idx), rtol=0, atol=1e-5)
    got, _ = run(generate(model, prompt, 12, temperature=0.0))
    assert got == run(generate(plain, prompt, 12, temperature=0.0))[0]
    assert decode_layout(model) == 0  # done already
    model(torch.tensor([prompt])).logsumexp(-1).mean().backward()  # still trainable
    assert all(p.grad is not None and p.grad.shape == p.shape for p in model.parameters())


def test_decode_layout_leaves_bf16_weights_alone() -> None:
    """oneDNN's bf16 matmul is slower on the column-major layout: those weights stay as they are
    and decode as before."""
    model = model_for(n_kv_head=2).to(torch.bfloat16)
    assert decode_layout(model) == 0
    assert all(p.is_contiguous() for p in model.parameters())
    prompt = [5, 17, 3, 40]
    assert run(generate(model, prompt, 8, temperature=0.0))[0] == naive_greedy(model, prompt, 8)

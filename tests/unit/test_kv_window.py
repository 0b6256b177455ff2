"""Sliding-window layers keep a KV cache of their window only (a ring buffer), and decoding
through it is still exactly the full forward: Mistral (every layer slides) and Gemma 2/3
(local_layers), fp32 and bf16, the static cache, the continuous-batching rows and the
speculative rounds that cut the caches back."""

from __future__ import annotations

import itertools

import pytest
import torch

from lmforge.infer.engine import Engine
from lmforge.infer.generate import DecodeStep, generate
from lmforge.infer.sampling import SamplingParams
from lmforge.infer.speculative import SpecStats, speculative_generate
from lmforge.models.decoder import Decoder, DecoderConfig, KVCache
from lmforge.models.kv_cache import RowKVCache, ring_positions

W, N = 4, 16  # window, sequence length: 4 windows
BASE = dict(vocab_size=67, block_size=32, n_head=4, n_kv_head=2, n_embd=32, sliding_window=W)
GEMMA = dict(BASE, head_size=12, norm="rmsnorm1p", mlp="geglu", embed_scale=True,
             sandwich_norm=True, query_pre_attn_scalar=16.0, n_layer=3)
CONFIGS = {
    "mistral": DecoderConfig(**BASE, n_layer=2),  # type: ignore[arg-type]
    "gemma2": DecoderConfig(**GEMMA, local_layers=[0, 2],  # type: ignore[arg-type]
                            attn_softcap=5.0, logit_softcap=3.0),
    "gemma3": DecoderConfig(**GEMMA, local_layers=[0, 1], qk_norm=True,  # type: ignore[arg-type]
                            rope_local_theta=100.0),
}


def build(name: str, seed: int = 0, dtype: torch.dtype = torch.float32) -> Decoder:
    """Weights large enough for sharp attention: a key the window drops changes the logits."""
    model = Decoder(CONFIGS[name])
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.ndim == 2 else 0.1))
    return model.eval().to(dtype)


def ids(B: int, T: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 67, (B, T), generator=torch.Generator().manual_seed(seed))


def layer_bytes(cache: KVCache | RowKVCache, layer: int) -> int:
    return sum(t.numel() * t.element_size() for t in (cache.k[layer], cache.v[layer]))


def check_bounded(model: Decoder, cache: KVCache, batch: int, max_len: int) -> None:
    """Sliding layers hold W positions per row, full layers max_len, measured from the tensors."""
    cfg = model.cfg
    per_position = 2 * batch * cfg.kv_heads * cfg.head_dim * model.tok_emb.weight.element_size()
    for layer in range(cfg.n_layer):
        want = W if cfg.window(layer) is not None else max_len
        assert layer_bytes(cache, layer) == want * per_position, layer


def assert_decodes_like_full(got: torch.Tensor, full: torch.Tensor, dtype: torch.dtype) -> None:
    if dtype == torch.float32:
        torch.testing.assert_close(got, full, rtol=0, atol=1e-5)
    else:  # same bf16 weights, another summation order: a few bf16 ulps apart
        assert (got.float() - full.float()).abs().max() <= 0.02 * full.float().abs().max()
        assert (got.argmax(-1) == full.argmax(-1)).float().mean() >= 0.9


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_static_cache_decode_over_four_windows_is_the_full_forward(name: str,
                                                                   dtype: torch.dtype) -> None:
    """gpt-fast's path: a prefill longer than the window at input_pos 0..5, then one token per
    step at input_pos p up to 4 windows, the cache never told its length."""
    model = build(name, dtype=dtype)
    idx = ids(2, N, 1)
    with torch.no_grad():
        full = model(idx)
        cache = model.new_cache(batch=2, max_len=N)
        check_bounded(model, cache, 2, N)
        steps = [model(idx[:, :6], cache, input_pos=torch.arange(6))]
        steps += [model(idx[:, p : p + 1], cache, input_pos=torch.tensor([p]))
                  for p in range(6, N)]
    check_bounded(model, cache, 2, N)
    assert {t.dtype for t in (*cache.k, *cache.v)} == {dtype}
    assert_decodes_like_full(torch.cat(steps, dim=1), full, dtype)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_chunks_that_cross_and_exceed_the_window_are_the_full_forward(name: str) -> None:
    """Chunks of 3, 1, 6 (more than the window), 2 and 4 tokens continue the cache."""
    model = build(name)
    idx = ids(2, N, 2)
    with torch.no_grad():
        full = model(idx)
        cache = model.new_cache(batch=2, max_len=N)
        bounds = [0, 3, 4, 10, 12, 16]
        chunks = [model(idx[:, a:b], cache) for a, b in itertools.pairwise(bounds)]
    check_bounded(model, cache, 2, N)
    torch.testing.assert_close(torch.cat(chunks, dim=1), full, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_greedy_tokens_are_those_of_the_full_forward_and_the_unbounded_cache(name: str) -> None:
    model = build(name)
    prompt = ids(1, 5, 3)[0].tolist()
    got = list(generate(model, prompt, 3 * W + 3, temperature=0.0))
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(3 * W + 3):  # no cache at all: argmax of a full forward per token
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    assert got == seq[len(prompt):]
    # The layout before bounded caches: every layer keeps every position.
    unbounded, cfg = [], model.cfg
    cache = KVCache(cfg.n_layer, 1, cfg.kv_heads, N + 4, cfg.head_dim)
    with torch.no_grad():
        token = model(torch.tensor([prompt]), cache)[0, -1].argmax()
        for _ in range(3 * W + 3):
            unbounded.append(int(token))
            token = model(token.view(1, 1), cache)[0, -1].argmax()
    assert got == unbounded


@pytest.mark.parametrize("name", ["mistral", "gemma2"])
def test_row_cache_rows_past_the_window_decode_like_full_forwards(name: str) -> None:
    """Continuous batching: rows prefilled alone (2, 9 and 5 tokens), then stepped together
    to 4 windows and more, each row's logits those of its own full forward; the sliding
    layers stop growing at the window."""
    model = build(name)
    seqs = [ids(1, 2 + 12, 4)[0], ids(1, 9 + 12, 5)[0], ids(1, 5 + 12, 6)[0]]
    starts = [2, 9, 5]
    cache = model.new_row_cache(3, reserve=2)
    with torch.no_grad():
        fulls = [model(s[None])[0] for s in seqs]
        for row, (seq, n) in enumerate(zip(seqs, starts)):
            cache.grow(n)
            model(seq[None, :n], cache.rows(row, row + 1))
        for t in range(12):
            cache.grow(max(starts) + t + 1)
            step = torch.stack([s[n + t : n + t + 1] for s, n in zip(seqs, starts)])  # (3, 1)
            logits = model(step, cache.rows(0, 3))[:, -1]
            for row, n in enumerate(starts):
                torch.testing.assert_close(logits[row], fulls[row][n + t], rtol=0, atol=1e-5)
    assert cache.capacity == 32  # 2 -> 9 -> 18 -> 32 for the full layers
    per_position = 2 * 3 * model.cfg.kv_heads * model.cfg.head_dim * 4
    for layer in range(model.cfg.n_layer):
        sliding = model.cfg.window(layer) is not None
        assert layer_bytes(cache, layer) == (W if sliding else 32) * per_position
    assert cache.grown_nbytes == cache.nbytes


def test_speculative_rounds_that_cut_the_cache_back_keep_greedy_exact() -> None:
    """Rejected drafts are cut back after the ring passed them: the window + k positions kept
    still hold every key the window needs."""
    target, draft = build("gemma3", seed=0), build("gemma3", seed=1)  # a poor draft
    prompt = ids(1, 3, 7)[0].tolist()
    stats = SpecStats()
    got = list(speculative_generate(target, draft, prompt, 16, k=3, temperature=0.0,
                                    stats=stats))
    assert got == list(generate(target, prompt, 16, temperature=0.0))
    assert stats.accepted < stats.proposed  # some rounds were cut back


def test_engine_rows_with_a_draft_past_the_window_keep_greedy_exact() -> None:
    target, draft = build("mistral", seed=0), build("mistral", seed=1)
    engine = Engine(target, lambda ids: "", eos_id=None, max_batch=2, draft=draft,
                    draft_tokens=3)
    prompts = [ids(1, 3, 7)[0].tolist(), ids(1, 7, 8)[0].tolist()]
    handles = [engine.submit(p, SamplingParams(max_tokens=16, temperature=0.0)) for p in prompts]
    for handle, p in zip(handles, prompts):
        assert handle.result().token_ids == list(generate(target, p, 16, temperature=0.0))
    assert engine.spec.accepted < engine.spec.proposed  # some rounds were cut back
    assert {k.shape[2] for k in engine.cache.k} == {W + 3}  # the window + k, not 32


def test_ring_positions_name_the_last_write_of_each_slot() -> None:
    """Brute force: write positions 0..p into slot p % size, then read what each slot holds."""
    for size in (1, 3, 4):
        for p in range(-1, 11):
            held = [-1 - s for s in range(size)]  # never written: any negative number
            for q in range(p + 1):
                held[q % size] = q
            got = ring_positions(torch.tensor(p), size, size).tolist()
            assert [g if g >= 0 else -1 for g in got] == [h if h >= 0 else -1 for h in held]


@pytest.mark.slow
def test_compiled_decode_through_the_ring_gives_the_eager_tokens() -> None:
    """torch.compile of the one-token step (fullgraph, static shapes) over the ring buffer:
    the same greedy tokens as eager across 3 windows, and the step really ran compiled."""
    model = build("gemma2")
    prompt = ids(1, 5, 9)[0].tolist()
    eager = list(generate(model, prompt, 3 * W, temperature=0.0))
    cache = model.new_cache(1, 5 + 3 * W)  # the last step writes position 5 + 3W - 1
    step = DecodeStep(model, compile=True)
    with torch.inference_mode():
        logits = model(torch.tensor([prompt]), cache, input_pos=torch.arange(5), last=True)
        got, pos = [], torch.tensor([5])
        for _ in range(3 * W):
            got.append(int(logits[0, -1].argmax()))
            logits = step(torch.tensor([[got[-1]]]), cache, pos)[:, None]
            pos += 1
    assert step.compiled and got == eager

"""The decoder's invariants with Gemma's fields set: per-layer windows in every mask path
(full forward, packed rows, the static and the continuous-batching KV caches), the local RoPE,
the soft caps against PyTorch's own attention and RMSNorm, and the capped logits in the loss."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from lmforge.config import ConfigError
from lmforge.models.decoder import (
    Decoder,
    DecoderConfig,
    RMSNorm1p,
    RopeScaling,
    count_params,
    softcapped_attention,
)

GEMMA = dict(vocab_size=67, block_size=32, n_head=4, n_kv_head=2, n_embd=32, head_size=12,
             norm="rmsnorm1p", mlp="geglu", embed_scale=True, sandwich_norm=True,
             query_pre_attn_scalar=16.0, sliding_window=5)
VARIANTS = {
    # Gemma 2: layers 0 and 2 slide, both soft caps
    "gemma2": DecoderConfig(**GEMMA, n_layer=3, local_layers=[0, 2],  # type: ignore[arg-type]
                            attn_softcap=5.0, logit_softcap=3.0),
    # Gemma 3: q/k norms, layers 0 and 1 slide with their own RoPE base, the global one is scaled
    "gemma3": DecoderConfig(**GEMMA, n_layer=3, local_layers=[0, 1],  # type: ignore[arg-type]
                            qk_norm=True, rope_local_theta=100.0,
                            rope_scaling=RopeScaling("linear", 2.0)),
}


def build(cfg: DecoderConfig, seed: int = 0) -> Decoder:
    """A model with weights large enough for sharp attention and caps that bite."""
    model = Decoder(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.ndim == 2 else 0.1))
    return model.eval()


def ids(B: int, T: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 67, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", list(VARIANTS))
def test_future_token_never_changes_past_logits(name: str) -> None:
    model = build(VARIANTS[name])
    idx = ids(2, 20, 1)
    changed = idx.clone()
    changed[:, 11] = (idx[:, 11] + 1) % 67
    with torch.no_grad():
        a, b = model(idx), model(changed)
    torch.testing.assert_close(a[:, :11], b[:, :11], rtol=0, atol=1e-6)
    assert (a[:, 11:] - b[:, 11:]).abs().amax() > 1e-3


@pytest.mark.parametrize("name", list(VARIANTS))
def test_static_cache_at_explicit_positions_matches_full_forward(name: str) -> None:
    """Prefill 9 tokens at input_pos 0..8, then one per step up to 23 (window 5)."""
    model = build(VARIANTS[name])
    idx = ids(2, 24, 2)
    with torch.no_grad():
        full = model(idx)
        cache = model.new_cache(batch=2, max_len=24)
        first = model(idx[:, :9], cache, input_pos=torch.arange(9), last=True)
        steps = [model(idx[:, p:p + 1], cache, input_pos=torch.tensor([p]))
                 for p in range(9, 24)]
    torch.testing.assert_close(first, full[:, 8:9], rtol=0, atol=1e-5)
    torch.testing.assert_close(torch.cat(steps, dim=1), full[:, 9:], rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_kv_cache_chunks_match_full_forward(name: str) -> None:
    model = build(VARIANTS[name])
    idx = ids(2, 30, 3)
    with torch.no_grad():
        full = model(idx)
        cache = model.new_cache(batch=2, max_len=30)
        chunks = [model(idx[:, a:b], cache) for a, b in [(0, 7), (7, 8), (8, 19), (19, 30)]]
    torch.testing.assert_close(torch.cat(chunks, dim=1), full, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_row_cache_rows_of_different_lengths_match_full_forwards(name: str) -> None:
    """Continuous batching: one decode step of rows 3, 11 and 7 long (two windows' masks)."""
    model = build(VARIANTS[name])
    seqs = [ids(1, n, n)[0] for n in (3, 11, 7)]
    cache = model.new_row_cache(3)
    with torch.no_grad():
        for row, seq in enumerate(seqs):
            model(seq[None, :-1], cache.rows(row, row + 1))
        batched = model(torch.stack([s[-1:] for s in seqs]), cache.rows(0, 3))[:, -1]
        for row, seq in enumerate(seqs):
            torch.testing.assert_close(batched[row], model(seq[None])[0, -1], rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_packed_rows_give_each_example_its_own_logits(name: str) -> None:
    model = build(VARIANTS[name])
    a, b = ids(1, 13, 4), ids(1, 9, 5)
    segments = torch.tensor([[0] * 13 + [1] * 9])
    with torch.no_grad():
        packed = model(torch.cat((a, b), dim=1), segments=segments)
        alone = torch.cat((model(a), model(b)), dim=1)
    torch.testing.assert_close(packed, alone, rtol=0, atol=1e-5)


def test_bf16_static_cache_decode_matches_bf16_full_forward() -> None:
    model = build(VARIANTS["gemma2"]).to(torch.bfloat16)
    idx = ids(2, 20, 6)
    with torch.no_grad():
        full = model(idx).float()
        cache = model.new_cache(batch=2)
        steps = [model(idx[:, :6], cache, input_pos=torch.arange(6))]
        steps += [model(idx[:, p:p + 1], cache, input_pos=torch.tensor([p]))
                  for p in range(6, 20)]
    got = torch.cat(steps, dim=1).float()
    assert got.abs().max() <= 3.0  # the logit cap holds in bf16
    assert (got - full).abs().max() <= 0.02 * full.abs().max()


def test_softcapped_attention_with_a_far_cap_is_pytorch_sdpa() -> None:
    """A cap far above every score changes nothing: the written-out attention (GQA, scale,
    bottom-right causal, bool masks) must then be PyTorch's SDPA."""
    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(2, h, t, 8, generator=g) for h, t in ((4, 5), (2, 9), (2, 9)))
    mask = torch.rand(5, 9, generator=g) > 0.3
    mask[:, 0] = True
    for kw in ({"is_causal": True}, {"attn_mask": mask}, {"attn_mask": mask, "scale": 0.2}):
        want = F.scaled_dot_product_attention(q, k, v, enable_gqa=True, **kw)  # type: ignore[arg-type]
        got = softcapped_attention(q, k, v, enable_gqa=True, softcap=1e6, **kw)  # type: ignore[arg-type]
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    capped = softcapped_attention(q, k, v, enable_gqa=True, is_causal=True, softcap=0.5)
    assert (capped - F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                    enable_gqa=True)).abs().max() > 1e-2


def test_rmsnorm1p_is_pytorch_rms_norm_with_one_plus_weight_in_fp32() -> None:
    norm = RMSNorm1p(16, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_(0, 0.5)
    x = torch.randn(3, 16).to(torch.bfloat16)
    want = F.rms_norm(x.float(), (16,), 1 + norm.weight, 1e-6).to(torch.bfloat16)
    torch.testing.assert_close(norm(x), want, rtol=0, atol=0)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_count_params_and_meta_build(name: str) -> None:
    cfg = VARIANTS[name]
    with torch.device("meta"):
        meta = Decoder(cfg)
    assert count_params(cfg) == meta.num_params()
    meta.to_empty(device="cpu")
    meta.init_weights(torch.Generator().manual_seed(0))
    ref = Decoder(cfg)
    ref.init_weights(torch.Generator().manual_seed(0))
    for (k, a), b in zip(meta.state_dict().items(), ref.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    assert all(not n.weight.any() for n in meta.modules() if isinstance(n, RMSNorm1p))


def test_training_loss_sees_the_capped_logits() -> None:
    """The chunked head+loss path skips models whose logits are capped after the head."""
    from lmforge.train.losses import causal_lm_loss

    model = build(VARIANTS["gemma2"])
    x, y = ids(2, 12, 8), ids(2, 12, 9)
    total, count = causal_lm_loss()(model, x, y)
    assert int(count) == 24
    want = F.cross_entropy(model(x).flatten(0, 1), y.flatten(), reduction="sum")
    torch.testing.assert_close(total, want)
    uncapped = Decoder(dataclasses.replace(model.cfg, logit_softcap=None)).eval()
    uncapped.load_state_dict(model.state_dict())
    assert (causal_lm_loss()(uncapped, x, y)[0] - want).abs() > 1.0


@pytest.mark.parametrize("changes, field", [({"local_layers": [0, 3]}, "local_layers"),
                                            ({"pos": "learned", "rope_local_theta": 10.0},
                                             "rope_local_theta"),
                                            ({"attn_softcap": 0.0}, "attn_softcap"),
                                            ({"norm": "gemma"}, "norm")])
def test_config_errors_name_the_field(changes: dict[str, object], field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        dataclasses.replace(VARIANTS["gemma2"], **changes)  # type: ignore[arg-type]


def test_lora_and_activation_checkpointing_find_gemma_layers() -> None:
    """Gemma keeps the q/k/v/o and gate/up/down names: LoRA wraps them, merging gives the
    same logits, and checkpointed blocks give the same loss gradient."""
    from lmforge.models.lora import apply_lora, merge_lora
    from lmforge.parallel import apply_ac

    model = build(VARIANTS["gemma3"])
    x = ids(2, 12, 10)
    names = apply_lora(model, 4, 8.0, 0.0,
                       ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                        "down_proj"])
    assert len(names) == 7 * 3
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
        before = model(x)
        assert torch.allclose(merge_lora(model)(x), before, atol=1e-5)
    plain, checkpointed = build(VARIANTS["gemma3"]).train(), build(VARIANTS["gemma3"]).train()
    apply_ac(checkpointed)
    for m in (plain, checkpointed):
        m(x).logsumexp(-1).sum().backward()
    for (n, a), b in zip(plain.named_parameters(), checkpointed.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6, msg=n)

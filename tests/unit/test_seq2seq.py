"""The encoder-decoder: the paper's equations, causality, caches, padding, pairs data, synth."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import Tensor

from lmforge.config import ConfigError, UserError, field_docs
from lmforge.data.pairs import (
    IGNORE,
    Pair,
    PairBatches,
    PairIds,
    collate,
    encode_pairs,
    pairs_folder,
    read_pairs,
)
from lmforge.data.synth import SynthConfig, apply_task, write_synthetic
from lmforge.data.tokenizer import load_tokenizer
from lmforge.infer.seq2seq_generate import generate_seq2seq
from lmforge.models.registry import preset, preset_names
from lmforge.models.seq2seq import Seq2Seq, Seq2SeqConfig, count_params

V = 53


def tiny(**kw: object) -> Seq2SeqConfig:
    base: dict[str, object] = dict(vocab_size=V, block_size=32, n_encoder_layer=2,
                                   n_decoder_layer=2, n_head=4, n_embd=32, dropout=0.0)
    base.update(kw)
    return Seq2SeqConfig(**base)  # type: ignore[arg-type]


def build(cfg: Seq2SeqConfig, seed: int = 0) -> Seq2Seq:
    model = Seq2Seq(cfg)
    model.init_weights(torch.Generator().manual_seed(seed))
    with torch.no_grad():  # break the zero biases / unit norms so every weight matters
        for i, p in enumerate(model.parameters()):
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(i)))
    return model.eval()

@pytest.fixture
def one_thread() -> Iterator[None]:
    """Tiny models train faster on one thread: a second costs more than it gives (measured
    12 ms vs 90 ms per step on a busy 2-core machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


VARIANTS = {
    "post": tiny(),
    "pre": tiny(norm="pre"),
    "post-untied-gelu": tiny(tie_embeddings=False, activation="gelu"),
    "pre-untied": tiny(norm="pre", tie_embeddings=False, n_decoder_layer=3),
}


def _ids(seed: int, B: int, L: int) -> Tensor:
    return torch.randint(3, V, (B, L), generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- the paper, written out


def paper_positions(n: int, d: int) -> Tensor:
    """PE(pos, 2i) = sin(pos / 10000^(2i/d)), PE(pos, 2i+1) = cos(...), stored sines first."""
    pe = torch.zeros(n, d, dtype=torch.float64)
    for pos in range(n):
        for i in range(d // 2):
            angle = pos / 10000 ** (2 * i / d)
            pe[pos, i], pe[pos, d // 2 + i] = math.sin(angle), math.cos(angle)
    return pe.float()


def _ln(x: Tensor, sd: dict[str, Tensor], name: str, eps: float) -> Tensor:
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * sd[f"{name}.weight"] + sd[f"{name}.bias"]


def _attention(sd: dict[str, Tensor], p: str, x: Tensor, mem: Tensor, allowed: Tensor,
               H: int) -> Tensor:
    """MultiHead(Q, K, V) = Concat(head_1..h) W^O, head = softmax(Q K^T / sqrt(d_k)) V."""
    def lin(t: Tensor, n: str) -> Tensor:
        return t @ sd[f"{p}.{n}.weight"].T + sd[f"{p}.{n}.bias"]

    B, T, C = x.shape
    D = C // H
    q = lin(x, "q_proj").view(B, T, H, D).transpose(1, 2)
    k = lin(mem, "k_proj").view(B, -1, H, D).transpose(1, 2)
    v = lin(mem, "v_proj").view(B, -1, H, D).transpose(1, 2)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(D)  # (B, H, T, S)
    weights = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
    return lin((weights @ v).transpose(1, 2).reshape(B, T, C), "out_proj")


def _ffn(sd: dict[str, Tensor], p: str, x: Tensor, act: str) -> Tensor:
    """FFN(x) = max(0, x W1 + b1) W2 + b2 (or GELU instead of the max)."""
    h = x @ sd[f"{p}.fc1.weight"].T + sd[f"{p}.fc1.bias"]
    h = h.clamp(min=0) if act == "relu" else 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))
    return h @ sd[f"{p}.fc2.weight"].T + sd[f"{p}.fc2.bias"]


def _sub(x: Tensor, f, sd: dict[str, Tensor], norm: str, pre: bool, eps: float) -> Tensor:  # type: ignore[no-untyped-def]
    """Post-norm LayerNorm(x + Sublayer(x)), or pre-norm x + Sublayer(LayerNorm(x))."""
    return x + f(_ln(x, sd, norm, eps)) if pre else _ln(x + f(x), sd, norm, eps)


def reference_transformer(sd: dict[str, Tensor], cfg: Seq2SeqConfig, src: Tensor,
                          src_mask: Tensor, tgt: Tensor) -> Tensor:
    """The Transformer of Vaswani et al. 2017 with plain tensor ops; logits (B, T, V)."""
    C, H, eps, pre = cfg.n_embd, cfg.n_head, cfg.norm_eps, cfg.norm == "pre"
    S, T = src.shape[1], tgt.shape[1]
    pe = paper_positions(max(S, T), C)
    src_emb = sd["shared.weight" if cfg.tie_embeddings else "encoder.embed_tokens.weight"]
    tgt_emb = sd["shared.weight" if cfg.tie_embeddings else "decoder.embed_tokens.weight"]
    x = src_emb[src] * math.sqrt(C) + pe[:S]
    keys = src_mask[:, None, None, :]  # (B, 1, 1, S)
    for i in range(cfg.n_encoder_layer):
        p = f"encoder.layers.{i}"
        x = _sub(x, lambda h, p=p: _attention(sd, f"{p}.self_attn", h, h, keys, H), sd,
                 f"{p}.self_attn_layer_norm", pre, eps)
        x = _sub(x, lambda h, p=p: _ffn(sd, p, h, cfg.activation), sd,
                 f"{p}.final_layer_norm", pre, eps)
    memory = _ln(x, sd, "encoder.layer_norm", eps) if pre else x
    y = tgt_emb[tgt] * math.sqrt(C) + pe[:T]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    for i in range(cfg.n_decoder_layer):
        p = f"decoder.layers.{i}"
        y = _sub(y, lambda h, p=p: _attention(sd, f"{p}.self_attn", h, h, causal, H), sd,
                 f"{p}.self_attn_layer_norm", pre, eps)
        y = _sub(y, lambda h, p=p: _attention(sd, f"{p}.encoder_attn", h, memory, keys, H), sd,
                 f"{p}.encoder_attn_layer_norm", pre, eps)
        y = _sub(y, lambda h, p=p: _ffn(sd, p, h, cfg.activation), sd,
                 f"{p}.final_layer_norm", pre, eps)
    if pre:
        y = _ln(y, sd, "decoder.layer_norm", eps)
    out = sd["shared.weight" if cfg.tie_embeddings else "lm_head.weight"]
    return y @ out.T


@pytest.mark.parametrize("name", list(VARIANTS))
def test_matches_the_paper_written_out_with_the_same_weights(name: str) -> None:
    cfg = VARIANTS[name]
    model = build(cfg)
    src, tgt = _ids(1, 3, 9), _ids(2, 3, 7)
    src_mask = torch.ones(3, 9, dtype=torch.bool)
    src_mask[1, 6:] = False
    src_mask[2, 2:] = False
    with torch.no_grad():
        ours = model(src, tgt, src_mask)
        ref = reference_transformer(model.state_dict(), cfg, src, src_mask, tgt)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)


# --------------------------------------------------------------------------- masks


@pytest.mark.parametrize("name", ["post", "pre"])
def test_future_target_token_never_changes_past_logits(name: str) -> None:
    model = build(VARIANTS[name])
    src, tgt = _ids(3, 2, 8), _ids(4, 2, 12)
    t = 6
    changed = tgt.clone()
    changed[:, t] = (tgt[:, t] + 1) % V
    with torch.no_grad():
        a, b = model(src, tgt), model(src, changed)
    torch.testing.assert_close(a[:, :t], b[:, :t], rtol=0, atol=1e-6)
    assert (a[:, t:] - b[:, t:]).abs().amax() > 1e-3


def test_source_padding_never_changes_the_output() -> None:
    model = build(VARIANTS["post"])
    src, tgt = _ids(5, 1, 6), _ids(6, 1, 5)
    padded = torch.cat((src, _ids(7, 1, 4)), dim=1)  # 4 padding positions of any ids
    mask = torch.tensor([[True] * 6 + [False] * 4])
    with torch.no_grad():
        alone = model(src, tgt)
        torch.testing.assert_close(model(padded, tgt, mask), alone, rtol=0, atol=1e-5)
        assert (model(padded, tgt) - alone).abs().amax() > 1e-3  # unmasked padding leaks in


# --------------------------------------------------------------------------- cache and generation


@pytest.mark.parametrize("name", ["post", "pre-untied"])
def test_cached_steps_match_the_full_decode(name: str) -> None:
    model = build(VARIANTS[name])
    src, tgt = _ids(8, 2, 7), _ids(9, 2, 10)
    with torch.no_grad():
        memory = model.encode(src)
        full = model.decode(tgt, memory)
        cache = model.new_cache(batch=2, max_len=10)
        steps = [model.decode(tgt[:, :4], memory, None, cache)]  # a chunk, then single tokens
        steps += [model.decode(tgt[:, i : i + 1], None, None, cache) for i in range(4, 10)]
    assert cache.length == 10
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ["post", "pre"])
def test_cached_greedy_decode_equals_uncached(name: str) -> None:
    model = build(VARIANTS[name], seed=3)
    sources = [[5, 9, 11, 2], [7, 8], [30, 31, 32, 33, 34, 35]]  # ragged: padded inside
    kw = dict(max_new_tokens=12, bos_id=1, eos_id=0, pad_id=2)
    cached = generate_seq2seq(model, sources, use_cache=True, **kw)  # type: ignore[arg-type]
    plain = generate_seq2seq(model, sources, use_cache=False, **kw)  # type: ignore[arg-type]
    assert cached == plain
    assert all(len(o) > 0 for o in cached)
    one_by_one = [generate_seq2seq(model, [s], **kw)[0] for s in sources]  # type: ignore[arg-type]
    assert one_by_one == cached  # padding a source inside a batch changes nothing


def test_cross_attention_keys_values_are_computed_once() -> None:
    model = build(VARIANTS["post"])
    calls = {"k": 0, "v": 0}
    for layer in model.decoder.layers:
        layer.encoder_attn.k_proj.register_forward_hook(lambda *_: calls.__setitem__("k", calls["k"] + 1))
        layer.encoder_attn.v_proj.register_forward_hook(lambda *_: calls.__setitem__("v", calls["v"] + 1))
    out = generate_seq2seq(model, [[5, 6, 7], [8, 9]], max_new_tokens=8, bos_id=1, eos_id=-1,
                           pad_id=2)
    assert [len(o) for o in out] == [8, 8]  # eos_id -1 never comes: 8 decode steps
    assert calls == {"k": 2, "v": 2}  # once per decoder layer, not once per step
    calls.update(k=0, v=0)
    generate_seq2seq(model, [[5, 6, 7]], max_new_tokens=8, bos_id=1, eos_id=-1, pad_id=2,
                     use_cache=False)
    assert calls == {"k": 16, "v": 16}  # the uncached reference recomputes every step


def test_sampling_is_reproducible_with_a_seed() -> None:
    model = build(VARIANTS["pre"])
    kw = dict(max_new_tokens=10, bos_id=1, eos_id=0, pad_id=2, temperature=1.0, top_k=20)
    a = generate_seq2seq(model, [[4, 5, 6]], seed=7, **kw)  # type: ignore[arg-type]
    b = generate_seq2seq(model, [[4, 5, 6]], seed=7, **kw)  # type: ignore[arg-type]
    assert a == b


@pytest.mark.parametrize("norm", ["post", "pre"])
def test_both_norm_layouts_learn_to_copy(norm: str, one_thread: None) -> None:
    torch.manual_seed(0)
    model = Seq2Seq(tiny(norm=norm, n_encoder_layer=1, n_decoder_layer=1))
    model.init_weights(torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(100):
        items = [([*s, 0], s) for s in torch.randint(3, 13, (16, 5), generator=g).tolist()]
        (src, tgt_in, mask), labels = collate(items, PairIds(pad=2, bos=1, eos=0))
        loss = torch.nn.functional.cross_entropy(model(src, tgt_in, mask).flatten(0, 1),
                                                 labels.flatten(), ignore_index=IGNORE)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    # Without reading the source the best loss is ~ln(10) = 2.3 (10 equally likely tokens).
    assert sum(losses[-5:]) / 5 < 1.0


# --------------------------------------------------------------------------- build, counts, presets


def test_meta_build_keeps_embeddings_shared() -> None:
    with torch.device("meta"):
        model = Seq2Seq(tiny())
    model.to_empty(device="cpu")
    model.init_weights(torch.Generator().manual_seed(0))
    w = model.shared.weight  # type: ignore[union-attr]
    assert model.encoder.embed_tokens.weight is w and model.decoder.embed_tokens.weight is w
    assert model.lm_head.weight is w
    assert abs(float(w.detach().std()) - 32 ** -0.5) < 0.02
    assert torch.allclose(model.pos_table, paper_positions(32, 32), atol=1e-5)
    assert "pos_table" not in model.state_dict()


@pytest.mark.parametrize("name", list(VARIANTS))
def test_count_is_predicted_from_the_config(name: str) -> None:
    assert Seq2Seq(VARIANTS[name]).num_params() == count_params(VARIANTS[name])


EXPECTED = {"transformer-tiny": 1_449_984, "transformer-small": 6_578_176,
            "transformer-base": 63_082_496}


def test_seq2seq_presets_are_the_documented_set() -> None:
    assert preset_names("seq2seq") == list(EXPECTED)


@pytest.mark.parametrize("name", list(EXPECTED))
def test_every_seq2seq_preset_builds_with_predicted_count(name: str) -> None:
    cfg = preset(name, "seq2seq")
    assert isinstance(cfg, Seq2SeqConfig)
    with torch.device("meta"):
        model = Seq2Seq(cfg)
    assert model.num_params() == count_params(cfg) == EXPECTED[name]


def test_config_errors_and_docs() -> None:
    with pytest.raises(ConfigError, match="norm"):
        tiny(norm="sandwich")
    with pytest.raises(ConfigError, match="n_head"):
        tiny(n_head=3)
    docs = field_docs(Seq2SeqConfig)
    assert all(docs.get(f) for f in Seq2SeqConfig.__dataclass_fields__)
    with pytest.raises(ConfigError, match="block_size"):
        Seq2Seq(tiny()).encode(torch.zeros(1, 33, dtype=torch.long))


# --------------------------------------------------------------------------- pairs data


def test_read_pairs_errors_name_file_and_line(tmp_path: Path) -> None:
    f = tmp_path / "p.jsonl"
    f.write_text('{"source": "a", "target": "b"}\n\n{"source": "a"}\n')
    with pytest.raises(UserError, match=r"p\.jsonl:3: field 'target' is missing"):
        read_pairs(f)
    f.write_text('{"source": "a", "target": "b"}\n{"source": "a", "target": 3}\n')
    with pytest.raises(UserError, match=r"p\.jsonl:2: field 'target' is a int"):
        read_pairs(f)
    f.write_text('{"source": "a", "target": "b"}\nnot json\n')
    with pytest.raises(UserError, match=r"p\.jsonl:2: not a valid JSON line"):
        read_pairs(f)
    f.write_text('{"source": "a b", "target": "b a"}\n\n')
    assert read_pairs(f) == [Pair("a b", "b a")]
    with pytest.raises(UserError, match="has no val.jsonl"):
        (tmp_path / "train.jsonl").write_text("")
        pairs_folder(tmp_path)


def test_collate_is_teacher_forcing_with_padding() -> None:
    ids = PairIds(pad=9, bos=8, eos=7)
    (src, tgt_in, mask), labels = collate([([1, 2, 7], [3, 4]), ([5, 7], [6, 6, 6])], ids)
    assert src.tolist() == [[1, 2, 7], [5, 7, 9]]
    assert mask.tolist() == [[True, True, True], [True, True, False]]
    assert tgt_in.tolist() == [[8, 3, 4, 9], [8, 6, 6, 6]]
    assert labels.tolist() == [[3, 4, 7, IGNORE], [6, 6, 6, 7]]


def test_pair_batches_resume_exactly() -> None:
    items = [([i, 7], [i]) for i in range(10, 30)]
    ids = PairIds(pad=0, bos=1, eos=7)
    straight = PairBatches(items, 6, ids, seed=3)
    expected = [next(straight)[1] for _ in range(8)]  # crosses two epoch boundaries
    first = PairBatches(items, 6, ids, seed=3)
    for _ in range(4):
        next(first)
    resumed = PairBatches(items, 6, ids, seed=0)
    resumed.load_state_dict(first.state_dict())
    assert all(torch.equal(next(resumed)[1], want) for want in expected[4:])
    epoch = torch.cat(expected[:3])[:, 0].tolist()
    assert len(set(epoch)) == 18  # an epoch visits distinct pairs


# --------------------------------------------------------------------------- synthetic task


def test_synthetic_task_is_deterministic_held_out_and_tokenizes(tmp_path: Path) -> None:
    cfg = SynthConfig(task="reverse", out=str(tmp_path / "a"), n_train=300, n_val=40,
                      max_len=6, n_words=12)
    out = write_synthetic(cfg)
    write_synthetic(SynthConfig(**{**cfg.__dict__, "out": str(tmp_path / "b")}))
    for name in ("train.jsonl", "val.jsonl", "tokenizer.json"):
        assert (out / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    train_pairs, val = read_pairs(out / "train.jsonl"), read_pairs(out / "val.jsonl")
    assert len(train_pairs) == 300 and len(val) == 40
    assert not {p.source for p in val} & {p.source for p in train_pairs}
    assert all(p.target.split() == p.source.split()[::-1] for p in train_pairs)
    tok = load_tokenizer(out / "tokenizer.json")
    items, dropped = encode_pairs(tok, val, PairIds(1, 2, 0), max_len=64)
    assert dropped == 0 and tok.decode(items[0][1]) == val[0].target
    assert 3 not in {i for s, t in items for i in s + t}  # no [UNK]: every word is in the vocab
    assert json.loads((out / "synth.json").read_text())["config"]["task"] == "reverse"
    with pytest.raises(UserError, match="already exists"):
        write_synthetic(cfg)


def test_task_rules() -> None:
    words = ["ko", "ba", "zi"]
    assert apply_task("reverse", words) == ["zi", "ba", "ko"]
    assert apply_task("sort", words) == ["ba", "ko", "zi"]
    assert apply_task("copy", words) == words
    with pytest.raises(ConfigError, match="max_len"):
        SynthConfig(min_len=5, max_len=3)

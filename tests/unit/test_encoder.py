"""The BERT encoder: padding mask, bidirectionality, BERT's equations, heads, presets, counts."""

from __future__ import annotations

import io
import math
from collections.abc import Iterator

import pytest
import torch
from rich.console import Console
from torch import Tensor, nn

from lmforge.checkpoint import TrainState
from lmforge.config import ConfigError, OptimConfig, TrainConfig, field_docs
from lmforge.models.encoder import (
    Encoder,
    EncoderConfig,
    EncoderForClassification,
    EncoderForMaskedLM,
    count_params,
)
from lmforge.models.registry import preset, preset_names
from lmforge.train.loop import LoopHooks, train
from lmforge.train.optim import build_optimizer
from lmforge.utils.logging import RunLogger

V = 61


def tiny(**kw: object) -> EncoderConfig:
    base: dict[str, object] = dict(vocab_size=V, block_size=32, n_layer=2, n_head=4, n_embd=32,
                                   num_labels=3)
    base.update(kw)
    return EncoderConfig(**base)  # type: ignore[arg-type]


def build(cls: type[nn.Module], cfg: EncoderConfig, seed: int = 0) -> nn.Module:
    model = cls(cfg)
    model.init_weights(torch.Generator().manual_seed(seed))  # type: ignore[operator]
    with torch.no_grad():  # break the zero biases / unit norms so every weight matters
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    return model.eval()

@pytest.fixture
def one_thread() -> Iterator[None]:
    """Tiny models train faster on one thread: a second costs more than it gives (measured
    12 ms vs 90 ms per step on a busy 2-core machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# --------------------------------------------------------------------------- masking


def test_padding_never_changes_the_real_tokens() -> None:
    model = build(EncoderForMaskedLM, tiny())
    ids = torch.randint(0, V, (1, 9), generator=torch.Generator().manual_seed(1))
    padded = torch.cat((ids, torch.full((1, 5), 7)), dim=1)  # 5 padding tokens of any id
    other_pad = torch.cat((ids, torch.randint(0, V, (1, 5))), dim=1)
    mask = torch.cat((torch.ones(1, 9), torch.zeros(1, 5)), dim=1).long()
    with torch.no_grad():
        alone = model(ids)
        a = model(padded, mask)
        b = model(other_pad, mask)
        unmasked = model(padded)
    torch.testing.assert_close(a[:, :9], alone, rtol=0, atol=1e-5)
    torch.testing.assert_close(b[:, :9], alone, rtol=0, atol=1e-5)
    assert (unmasked[:, :9] - alone).abs().amax() > 1e-3  # without the mask, padding leaks in


def test_attention_is_bidirectional() -> None:
    model = build(EncoderForMaskedLM, tiny())
    ids = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(2))
    changed = ids.clone()
    changed[:, -1] = (ids[:, -1] + 1) % V
    with torch.no_grad():
        assert (model(ids)[:, 0] - model(changed)[:, 0]).abs().amax() > 1e-4


# --------------------------------------------------------------------------- BERT's equations


def _ln(x: Tensor, w: Tensor, b: Tensor, eps: float) -> Tensor:
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * w + b


def _gelu(x: Tensor) -> Tensor:
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def reference_bert(sd: dict[str, Tensor], cfg: EncoderConfig, ids: Tensor, mask: Tensor,
                   types: Tensor) -> tuple[Tensor, Tensor]:
    """BERT written out with matmuls, by HF's weight names: (hidden (B,T,C), MLM logits)."""
    def lin(x: Tensor, name: str) -> Tensor:
        return x @ sd[f"{name}.weight"].T + sd[f"{name}.bias"]

    B, T = ids.shape
    H, D, eps = cfg.n_head, cfg.head_dim, cfg.norm_eps
    e = "bert.embeddings."
    x = (sd[e + "word_embeddings.weight"][ids] + sd[e + "position_embeddings.weight"][:T]
         + sd[e + "token_type_embeddings.weight"][types])
    x = _ln(x, sd[e + "LayerNorm.weight"], sd[e + "LayerNorm.bias"], eps)
    bias = (1.0 - mask[:, None, None, :].float()) * -1e9  # additive mask on padded keys
    for i in range(cfg.n_layer):
        p = f"bert.encoder.layer.{i}."
        q, k, v = (lin(x, p + f"attention.self.{n}").view(B, T, H, D).transpose(1, 2)
                   for n in ("query", "key", "value"))
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(D) + bias, dim=-1)
        y = (att @ v).transpose(1, 2).reshape(B, T, H * D)
        x = _ln(lin(y, p + "attention.output.dense") + x,
                sd[p + "attention.output.LayerNorm.weight"],
                sd[p + "attention.output.LayerNorm.bias"], eps)
        h = lin(_gelu(lin(x, p + "intermediate.dense")), p + "output.dense")
        x = _ln(h + x, sd[p + "output.LayerNorm.weight"], sd[p + "output.LayerNorm.bias"], eps)
    t = "cls.predictions.transform."
    h = _ln(_gelu(lin(x, t + "dense")), sd[t + "LayerNorm.weight"], sd[t + "LayerNorm.bias"], eps)
    logits = h @ sd["bert.embeddings.word_embeddings.weight"].T + sd["cls.predictions.bias"]
    return x, logits


def test_matches_bert_written_out_with_the_same_weights() -> None:
    cfg = tiny()
    model = build(EncoderForMaskedLM, cfg)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, V, (2, 10), generator=g)
    types = torch.randint(0, 2, (2, 10), generator=g)
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, 7:] = 0
    with torch.no_grad():
        hidden, _ = model.bert(ids, mask, types)
        logits = model(ids, mask, types)
        ref_hidden, ref_logits = reference_bert(model.state_dict(), cfg, ids, mask, types)
    torch.testing.assert_close(hidden, ref_hidden, rtol=0, atol=1e-5)
    torch.testing.assert_close(logits[0], ref_logits[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(logits[1, :7], ref_logits[1, :7], rtol=0, atol=1e-5)


def test_weight_names_are_hugging_face_bert() -> None:
    keys = set(EncoderForMaskedLM(tiny(n_layer=1)).state_dict())
    assert {"bert.embeddings.word_embeddings.weight", "bert.embeddings.LayerNorm.bias",
            "bert.encoder.layer.0.attention.self.query.weight",
            "bert.encoder.layer.0.attention.output.LayerNorm.weight",
            "bert.encoder.layer.0.intermediate.dense.weight",
            "bert.encoder.layer.0.output.dense.bias", "cls.predictions.bias",
            "cls.predictions.transform.dense.weight", "cls.predictions.decoder.weight",
            "cls.predictions.decoder.bias"} <= keys
    assert not any(k.startswith("bert.pooler") for k in keys)  # as BertForMaskedLM
    cls_keys = set(EncoderForClassification(tiny(n_layer=1)).state_dict())
    assert {"bert.pooler.dense.weight", "classifier.weight", "classifier.bias"} <= cls_keys


# --------------------------------------------------------------------------- build and init


def test_meta_build_keeps_the_decoder_tied_and_init_is_seeded() -> None:
    cfg = tiny()
    with torch.device("meta"):
        model = EncoderForMaskedLM(cfg)
    model.to_empty(device="cpu")
    model.init_weights(torch.Generator().manual_seed(0))
    head = model.cls.predictions
    assert head.decoder.weight is model.bert.embeddings.word_embeddings.weight
    assert head.decoder.bias is head.bias and not head.bias.any()
    other = EncoderForMaskedLM(cfg)
    other.init_weights(torch.Generator().manual_seed(0))
    for (name, a), b in zip(model.state_dict().items(), other.state_dict().values()):
        assert torch.equal(a, b), name
    std = float(model.bert.encoder.layer[0].attention.self.query.weight.detach().std())
    assert abs(std - 0.02) < 0.003


@pytest.mark.parametrize("cls,head", [(EncoderForMaskedLM, "mlm"),
                                      (EncoderForClassification, "classify")])
def test_counts_are_predicted_from_the_config(cls: type[nn.Module], head: str) -> None:
    for cfg in (tiny(), tiny(intermediate_size=48, type_vocab_size=1)):
        assert cls(cfg).num_params() == count_params(cfg, head)  # type: ignore[operator,arg-type]
    assert sum(p.numel() for p in Encoder(tiny()).parameters()) == count_params(tiny(), "none")


EXPECTED = {"bert-tiny": 974_976, "bert-mini": 4_344_576, "bert-small": 15_107_584,
            "bert-base": 109_514_298}  # bert-base: HF BertForMaskedLM(bert-base-uncased)


def test_encoder_presets_are_the_documented_set() -> None:
    assert preset_names("encoder") == list(EXPECTED)


@pytest.mark.parametrize("name", list(EXPECTED))
def test_every_encoder_preset_builds_with_predicted_count(name: str) -> None:
    cfg = preset(name, "encoder")
    assert isinstance(cfg, EncoderConfig)
    with torch.device("meta"):
        model = EncoderForMaskedLM(cfg)
    assert model.num_params() == count_params(cfg) == EXPECTED[name]


def test_bert_base_classifier_count() -> None:
    cfg = preset("bert-base")
    assert isinstance(cfg, EncoderConfig)
    assert count_params(cfg, "classify") == 109_483_778  # HF BertForSequenceClassification


def test_decoder_preset_asked_for_as_an_encoder_names_the_right_ones() -> None:
    with pytest.raises(ConfigError, match="decoder preset.*bert-tiny, bert-mini"):
        preset("llama-1m", "encoder")


def test_config_errors_and_docs() -> None:
    with pytest.raises(ConfigError, match="n_head"):
        tiny(n_head=5)
    with pytest.raises(ConfigError, match="dropout"):
        tiny(dropout=1.0)
    docs = field_docs(EncoderConfig)
    assert all(docs.get(f) for f in EncoderConfig.__dataclass_fields__)
    model = EncoderForMaskedLM(tiny())
    with pytest.raises(ConfigError, match="block_size"):
        model(torch.zeros(1, 33, dtype=torch.long))


# --------------------------------------------------------------------------- classification


def _toy_batch(g: torch.Generator, B: int = 32, T: int = 10) -> tuple[Tensor, Tensor]:
    """Random filler tokens 10..60 and one marker: token 3 (class 0), 4 (class 1) or 5 (2)."""
    x = torch.randint(10, V, (B, T), generator=g)
    y = torch.randint(0, 3, (B,), generator=g)
    pos = torch.randint(1, T, (B,), generator=g)
    x[torch.arange(B), pos] = 3 + y
    x[:, 0] = 1  # a [CLS]-like first token, as the pooler expects
    return x, y


class ToyBatches:
    def __init__(self, seed: int) -> None:
        self.g = torch.Generator().manual_seed(seed)

    def __next__(self) -> tuple[Tensor, Tensor]:
        return _toy_batch(self.g)


def test_classifier_learns_a_separable_task_through_the_loop(one_thread: None) -> None:
    torch.manual_seed(0)
    cfg = tiny(n_layer=1, num_labels=3)
    model = EncoderForClassification(cfg)
    model.init_weights(torch.Generator().manual_seed(0))
    optim_cfg = OptimConfig(lr=1e-2, warmup_steps=5, weight_decay=0.0)
    train_cfg = TrainConfig(max_steps=60, batch_size=32, log_every=60, eval_every=60,
                            save_every=60)

    def loss_fn(m: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        # (B, num_labels) vs (B,): summed, with the row count, as train.losses' functions
        return nn.functional.cross_entropy(m(x), y, reduction="sum"), torch.tensor(len(y))

    console = Console(file=io.StringIO())
    with RunLogger(None, train_cfg.max_steps, console) as log:
        state = train(model, build_optimizer(model, optim_cfg), ToyBatches(1), loss_fn,
                      train_cfg, optim_cfg, TrainState(), log, LoopHooks())
    assert state.step == 60 and state.tokens == 60 * 32  # one "token" (label) per sequence
    x, y = _toy_batch(torch.Generator().manual_seed(99), B=512)
    model.eval()
    with torch.no_grad():
        accuracy = float((model(x).argmax(-1) == y).float().mean())
    assert accuracy > 0.95

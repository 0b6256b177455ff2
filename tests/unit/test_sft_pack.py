"""Packed SFT rows are document-isolated: each example trains exactly as it would alone."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import Tensor

from lmforge import cli
from lmforge.data.sft import SftBatches
from lmforge.models.decoder import Decoder, DecoderConfig, segment_mask, segment_positions
from lmforge.train.losses import causal_lm_loss, mean_loss, packed_lm_loss
from tests.serve import make_tiny_run

CONFIGS = {
    "llama": DecoderConfig(vocab_size=97, block_size=64, n_layer=2, n_head=4, n_kv_head=2,
                           n_embd=32),
    "llama-window": DecoderConfig(vocab_size=97, block_size=64, n_layer=2, n_head=4,
                                  n_kv_head=2, n_embd=32, sliding_window=5, qkv_bias=True),
    "gpt2": DecoderConfig(vocab_size=97, block_size=64, n_layer=2, n_head=4, n_embd=32,
                          norm="layernorm", pos="learned", mlp="gelu", bias=True,
                          tie_embeddings=False),
    "sinusoidal": DecoderConfig(vocab_size=97, block_size=64, n_layer=2, n_head=4, n_embd=32,
                                pos="sinusoidal"),
}


def examples(n: int, seed: int) -> list[tuple[Tensor, Tensor]]:
    """(x, y) pairs of lengths 3..20; about half of the targets carry no loss (-100)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(3, 21, (), generator=gen))
        x = torch.randint(0, 97, (length,), generator=gen)
        y = torch.randint(0, 97, (length,), generator=gen)
        y[torch.rand(length, generator=gen) < 0.5] = -100
        y[-1] = int(x[-1])  # at least one target with loss
        out.append((x, y))
    return out


def token_losses(model: Decoder, x: Tensor, y: Tensor, segments: Tensor | None = None) -> Tensor:
    logits = model(x, segments=segments)  # (B, T, V)
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(),
                                             ignore_index=-100, reduction="none").view(y.shape)


def model_of(name: str) -> Decoder:
    model = Decoder(CONFIGS[name])
    model.init_weights(torch.Generator().manual_seed(1))
    return model.eval()


@pytest.mark.parametrize("name", list(CONFIGS))
@torch.no_grad()
def test_packed_example_loss_equals_its_loss_alone(name: str) -> None:
    model = model_of(name)
    ex = examples(12, seed=3)
    batches = SftBatches(ex, batch_size=2, seq_len=48, pad_id=0, seed=0, pack=True)
    seen = 0
    for _ in range(3):  # one epoch: 12 examples of <= 20 tokens in rows of <= 48 -> <= 12 rows
        (x, segments), y = next(batches)
        losses = token_losses(model, x, y, segments)
        for b in range(len(x)):
            for s in segments[b].unique().tolist():
                if s < 0:  # padding: no loss at all
                    assert bool((y[b][segments[b] == s] == -100).all())
                    continue
                at = segments[b] == s
                ids = x[b][at][None]  # (1, L): this example alone
                match = [i for i, e in enumerate(ex) if torch.equal(e[0], ids[0])]
                assert len(match) == 1
                alone = token_losses(model, ids, ex[match[0]][1][None])[0]
                packed = losses[b][at]
                assert torch.allclose(packed, alone, atol=1e-5, rtol=0)
                labeled = ex[match[0]][1] != -100
                assert abs(float(packed[labeled].mean() - alone[labeled].mean())) < 1e-5
                seen += 1
    assert seen >= 12  # every example met at least once


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_packed_loss_fn_is_the_token_mean_of_the_examples_alone(name: str) -> None:
    model = model_of(name)
    ex = examples(6, seed=5)
    (x, segments), y = next(SftBatches(ex, batch_size=8, seq_len=64, pad_id=0, seed=0,
                                       pack=True))
    loss = mean_loss(packed_lm_loss(), model, (x, segments), y)
    with torch.no_grad():
        alone = torch.cat([token_losses(model, ex_x[None], ex_y[None])[0][ex_y != -100]
                           for ex_x, ex_y in ex])
    assert abs(float(loss.detach()) - float(alone.mean())) < 1e-5
    loss.backward()  # trains: gradients reach the weights through the block-diagonal mask
    assert model.tok_emb.weight.grad is not None


@pytest.mark.parametrize("name", list(CONFIGS))
@torch.no_grad()
def test_unpacked_path_is_unchanged_and_one_segment_matches_it(name: str) -> None:
    model = model_of(name)
    x = torch.randint(0, 97, (2, 30), generator=torch.Generator().manual_seed(0))
    plain = model(x)
    assert torch.equal(plain, model(x, segments=None))
    one = model(x, segments=torch.zeros_like(x))  # one segment = the ordinary causal mask
    assert torch.allclose(one, plain, atol=1e-5, rtol=0)
    two = model(x, segments=(torch.arange(30) >= 10).long().expand(2, 30))
    assert torch.allclose(two[:, :10], plain[:, :10], atol=1e-5, rtol=0)
    assert torch.allclose(two[:, 10:], model(x[:, 10:]), atol=1e-5, rtol=0)


def test_unpacked_batches_are_plain_tensors() -> None:
    x, y = next(SftBatches(examples(4, seed=0), batch_size=4, seq_len=32, pad_id=0, seed=0))
    assert isinstance(x, Tensor) and x.shape == y.shape
    total, count = causal_lm_loss()(model_of("llama"), x, y)
    assert total.ndim == 0 and int(count) == int((y != -100).sum())


def test_segment_positions_and_mask_by_hand() -> None:
    seg = torch.tensor([[0, 0, 0, 1, 1, -1], [0, 1, 2, 2, 2, 2]])
    assert segment_positions(seg).tolist() == [[0, 1, 2, 0, 1, 0], [0, 0, 0, 1, 2, 3]]
    mask = segment_mask(seg, window=None)[:, 0].int()  # (B, T, T)
    assert mask[0].tolist() == [[1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0],
                                [0, 0, 0, 1, 0, 0], [0, 0, 0, 1, 1, 0], [0, 0, 0, 0, 0, 1]]
    windowed = segment_mask(seg, window=2)[1, 0].int()
    assert windowed[5].tolist() == [0, 0, 0, 0, 1, 1]  # itself and one back, same segment
    assert bool(segment_mask(seg, 3).diagonal(dim1=-2, dim2=-1).all())  # never an empty row


def test_packing_keeps_examples_whole() -> None:
    ex = [(torch.arange(n), torch.arange(n)) for n in (3, 5, 7, 2)]
    packed = SftBatches(ex, batch_size=1, seq_len=8, pad_id=0, seed=0, pack=True)
    sizes = set()
    for _ in range(8):  # two epochs or more
        (x, seg), _ = next(packed)
        assert x.shape[1] <= 8 and bool((seg >= 0).all())  # batch of one row: no padding
        row = [int((seg[0] == s).sum()) for s in seg[0].unique()]
        assert all(n in (2, 3, 5, 7) for n in row)  # only whole examples
        sizes.update(row)
    assert sizes == {2, 3, 5, 7}


def test_segments_with_a_cache_are_refused() -> None:
    model = model_of("llama")
    x = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="segments"):
        model(x, model.new_cache(1), segments=torch.zeros_like(x))


def test_finetune_with_pack_runs_end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    base = make_tiny_run(tmp_path / "runs")
    rows = [{"prompt": f"add {a} and {b}", "completion": f"{a + b}"} for a in range(5)
            for b in range(4)]
    (tmp_path / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.chdir(tmp_path)
    assert cli.run(["finetune", "--run", str(base), "--data", "qa.jsonl", "--out", "packed",
                    "--pack", "--method", "full", "--max_len", "96", "--train.max_steps", "3",
                    "--train.batch_size", "2", "--train.threads", "1", "--optim.lr", "1e-3",
                    "--optim.warmup_steps", "0"]) == 0
    summary = json.loads((tmp_path / "runs" / "packed" / "summary.json").read_text())
    assert summary["steps"] == 3 and math.isfinite(summary["val_loss"])

"""Quantized inference (torchao, fbgemm): close to fp32, loaded without the fp32 model, one-line
errors."""

from __future__ import annotations

import copy
import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from lmforge.checkpoint import TrainState, save_checkpoint
from lmforge.config import UserError, to_dict
from lmforge.data.corpora import pydoc_topics_text
from lmforge.data.tokenizer import encode_batch, train_bpe, vocab_size_of
from lmforge.infer.generate import generate
from lmforge.infer.quant import (
    INT4_GROUP,
    OUTLIER,
    Int8DynamicLinear,
    Int8Embedding,
    SharedInput,
    load_quantized,
    quantize,
)
from lmforge.models.decoder import Decoder, DecoderConfig
from lmforge.run import load_run

# find_spec, not importorskip: importing torchao outside lmforge's quiet import logs noise
pytestmark = pytest.mark.skipif(importlib.util.find_spec("torchao") is None,
                                reason="pip install 'lmforge[quant]'")
SEQ = 64
QUANTIZED = ("int8", "int4", "int8-dynamic")


def _save_run(root: Path, model: Decoder, tok_json: str) -> Path:
    run = root / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"model": to_dict(model.cfg)}))
    (run / "tokenizer.json").write_text(tok_json)
    save_checkpoint(run, TrainState(step=1), model, None)
    return run


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Decoder, torch.Tensor, Path]:
    """A tiny Llama (width 64: one int4 group) trained for a few seconds on pydoc text, its
    held-out token windows, and the run folder it is saved in."""
    texts = [t for _, t in sorted(pydoc_topics_text().items())[:80]]
    tok = train_bpe(texts, 512)
    ids = torch.tensor([i for row in encode_batch(tok, texts) for i in row])
    train, val = ids[:-20 * SEQ], ids[-20 * SEQ - 1 :]
    cfg = DecoderConfig(vocab_size=vocab_size_of(tok), block_size=SEQ, n_layer=2, n_head=4,
                        n_kv_head=2, n_embd=64)
    model = Decoder(cfg)
    model.init_weights(torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(25):
        starts = torch.randint(0, len(train) - SEQ - 1, (8,), generator=gen)
        x = torch.stack([train[s : s + SEQ + 1] for s in starts])  # (8, SEQ+1)
        loss = F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return model, val, _save_run(tmp_path_factory.mktemp("quant"), model, tok.to_str())


@torch.no_grad()
def perplexity(model: nn.Module, val: torch.Tensor) -> float:
    n = (len(val) - 1) // SEQ
    x, y = val[: n * SEQ].view(n, SEQ), val[1 : n * SEQ + 1].view(n, SEQ)
    return math.exp(F.cross_entropy(model(x).float().flatten(0, 1), y.flatten()).item())


# Bounds on the relative error of the logits (||q - f|| / ||f||) on held-out text. int8 rounds
# each weight by at most half a step of max|w_row| / 127 (~0.3% of a typical weight, errors
# averaging out over a row): ~1e-3 at the logits; on a CPU in fp32 (fbgemm, = int8-dynamic) it
# also rounds every activation to 8 bits per token row; int4 has 15 steps per group of 64 (8x
# int8's step). Each bound is ~4x the error measured when it was written (int8 and int8-dynamic
# 0.0011, int4 0.0037; torchao's int8 weight-only, now the bf16/CUDA path, 0.0008), so a wrong
# scale, packing or kernel (errors of order 1) cannot pass.
LOGIT_BOUND = {"int8": 0.005, "int8-dynamic": 0.005, "int4": 0.015}
PPL_BOUND = {"int8": 0.002, "int8-dynamic": 0.004, "int4": 0.01}  # measured |change| 0.0001


@pytest.mark.parametrize("method", QUANTIZED)
def test_quantized_load_is_close_to_fp32(trained: tuple[Decoder, torch.Tensor, Path],
                                          method: str) -> None:
    model, val, run = trained
    q = load_run(run, "cpu", "fp32", method).model
    assert isinstance(q.tok_emb, Int8Embedding)
    assert q.lm_head.weight is q.tok_emb.weight  # the tied head shares the one int8 table
    x = val[: 4 * SEQ].view(4, SEQ)
    with torch.no_grad():
        want, got = model(x), q(x)
    rel = ((got - want).norm() / want.norm()).item()
    ppl = perplexity(q, val) / perplexity(model, val) - 1
    print(f"{method}: logits rel. error {rel:.4f}, perplexity change {ppl:+.4f}")
    assert 1e-5 < rel < LOGIT_BOUND[method]  # quantized, and close
    assert abs(ppl) < PPL_BOUND[method]
    prompt = val[:8].tolist()
    ref = list(generate(model, prompt, 16, temperature=0.0))
    out = list(generate(q, prompt, 16, temperature=0.0))
    assert sum(a == b for a, b in zip(out, ref)) >= 12  # greedy tokens mostly equal


def _rel(got: torch.Tensor, want: torch.Tensor) -> torch.Tensor:
    """Relative error of each row: ||got - want|| / ||want||."""
    return (got - want).norm(dim=-1) / want.norm(dim=-1)


def _layer(n_out: int = 96, n_in: int = 128, bias: bool = True) -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(n_in, n_out, bias=bias)


@torch.no_grad()
def test_int8_dynamic_row_is_pytorchs_dynamic_linear() -> None:
    """One token without outliers: the same int8 GEMM as PyTorch's own dynamic-quantized
    Linear (per-channel qconfig), which quantizes it with the same 8-bit grid (scaling a
    row scales fbgemm's step with it)."""
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear
    from torch.ao.quantization import per_channel_dynamic_qconfig

    linear = _layer()
    ours = Int8DynamicLinear(linear)
    linear.qconfig = per_channel_dynamic_qconfig  # type: ignore[assignment]
    ref = DynamicLinear.from_float(linear)
    x = torch.rand(1, 128, generator=torch.Generator().manual_seed(3)) * 2 - 1  # no outliers
    want = linear(x)
    assert torch.allclose(ours(x), ref(x), rtol=1e-4, atol=1e-4 * want.abs().max().item())
    assert 1e-5 < _rel(ours(x), want).item() < 0.02  # quantized, and close (~0.005)


@torch.no_grad()
def test_int8_dynamic_gives_each_token_its_own_step() -> None:
    """A batch with one token 1000x larger than the others: fbgemm alone (PyTorch's dynamic
    Linear) quantizes the small tokens with the large one's step and loses them; here each
    row keeps the error it has alone."""
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear
    from torch.ao.quantization import per_channel_dynamic_qconfig

    linear = _layer()
    ours = Int8DynamicLinear(linear)
    linear.qconfig = per_channel_dynamic_qconfig  # type: ignore[assignment]
    ref = DynamicLinear.from_float(linear)
    x = torch.randn(2, 4, 128, generator=torch.Generator().manual_seed(1))  # (B, T, K)
    x[0, 0] *= 1000
    want = linear(x)
    assert ours(x).shape == (2, 4, 96)
    alone = torch.stack([ours(row[None])[0] for row in x.view(8, 128)]).view(2, 4, 96)
    batch = _rel(ours(x), want)
    print(f"per row: in the batch {batch.max():.4f}, alone {_rel(alone, want).max():.4f}, "
          f"fbgemm alone {_rel(ref(x), want).max():.4f}")
    assert (batch < 2 * _rel(alone, want) + 1e-3).all()
    assert 1e-5 < batch.max() < 0.06  # measured 0.018
    assert _rel(ref(x), want).max() > 0.3  # the failure this guards against


@torch.no_grad()
def test_int8_dynamic_takes_outlier_features_apart(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows whose channel 5 is 100x the rest (LLM.int8()'s outlier features): with the split
    the other channels keep an 8-bit step of their own range; without it (OUTLIER = inf) the
    error is many times larger."""
    linear = _layer(bias=False)
    x = torch.randn(6, 128, generator=torch.Generator().manual_seed(2))
    x[:, 5] = 100 * x[:, 5].sign()
    assert (x.abs() > OUTLIER * x.abs().mean(-1, keepdim=True)).any(-1).all()
    want = linear(x)
    split = _rel(Int8DynamicLinear(linear)(x), want)
    monkeypatch.setattr("lmforge.infer.quant.OUTLIER", math.inf)
    whole = _rel(Int8DynamicLinear(linear)(x), want)
    assert split.max() < 0.04  # measured 0.009
    assert (whole > 3 * split).all()  # measured >= 5.3x


@torch.no_grad()
def test_int8_dynamic_siblings_share_only_the_same_input() -> None:
    """Layers fed one tensor (q/k/v) prepare it once; another tensor, or the same values in a
    new tensor, is prepared anew: each result equals the layer's own, unshared."""
    one = SharedInput()
    a, b = (Int8DynamicLinear(_layer(n_out), one) for n_out in (96, 32))
    alone = Int8DynamicLinear(_layer(32))
    x, z = torch.randn(3, 128), torch.randn(3, 128) * 10
    x[0, 7] = 50.0  # one outlier row
    a(x)
    assert one.ref is not None and one.ref() is x
    assert torch.equal(b(x), alone(x))
    assert torch.equal(b(z), alone(z)) and not torch.equal(b(z), alone(x))
    assert torch.equal(b(x.clone()), alone(x))


def test_int8_is_fbgemm_on_cpu_fp32_and_torchao_in_bf16(
        trained: tuple[Decoder, torch.Tensor, Path]) -> None:
    _, _, run = trained
    fp32 = load_run(run, "cpu", "fp32", "int8").model
    bf16 = load_run(run, "cpu", "bf16", "int8").model
    assert isinstance(fp32.blocks[0].attn.q_proj, Int8DynamicLinear)
    assert type(bf16.blocks[0].attn.q_proj) is nn.Linear
    assert type(bf16.blocks[0].attn.q_proj.weight).__name__ != "Parameter"  # torchao's int8


def test_bf16_int8_and_int4_load_and_decode(trained: tuple[Decoder, torch.Tensor, Path]) -> None:
    model, val, run = trained
    x = val[: 2 * SEQ].view(2, SEQ)
    with torch.no_grad():
        want = model(x)
    for method in ("int8", "int4"):
        q = load_run(run, "cpu", "bf16", method).model
        with torch.no_grad():
            got = q(x)
        assert got.dtype == torch.bfloat16
        rel = ((got.float() - want).norm() / want.norm()).item()
        assert rel < LOGIT_BOUND[method] + 0.02  # bf16 adds ~2^-8 per rounding, 2 blocks deep
        assert len(list(generate(q, [1, 2, 3], 4, temperature=0.0))) == 4


def test_quantize_after_loading_matches_quantize_while_loading(
        trained: tuple[Decoder, torch.Tensor, Path]) -> None:
    model, val, run = trained
    x = val[:SEQ][None]
    for method in QUANTIZED:
        late = quantize(copy.deepcopy(model), method)
        early = load_run(run, "cpu", "fp32", method).model
        with torch.no_grad():
            assert torch.equal(late(x), early(x)), method


def test_quantized_load_never_holds_the_fp32_model() -> None:
    """Build on meta and count, at every tensor read, the full-precision parameter bytes the
    model holds: at most one module's worth (the largest: the token table), never the model."""
    cfg = DecoderConfig(vocab_size=256, block_size=32, n_layer=6, n_head=4, n_kv_head=2,
                        n_embd=64)
    ref = Decoder(cfg)
    ref.init_weights(torch.Generator().manual_seed(0))
    weights = {k: v.clone() for k, v in ref.state_dict().items()}
    full = sum(p.numel() * p.element_size() for p in ref.parameters())
    with torch.device("meta"):
        model = Decoder(cfg)
    model.to(torch.float32)
    held: list[int] = []

    def read(name: str) -> torch.Tensor | None:
        held.append(sum(p.numel() * p.element_size() for p in model.parameters()
                        if type(p.data) is torch.Tensor and not p.is_meta))
        return weights.get(name)

    load_quantized(model, "int8", torch.device("cpu"), read, "test")
    table = cfg.vocab_size * cfg.n_embd * 4
    norms = sum(p.numel() * 4 for n, p in model.named_parameters() if "norm" in n)
    assert len(held) > 6 * 7  # read one tensor at a time
    assert max(held) <= table + norms < full / 4
    assert held[-1] <= norms  # every linear layer and the table are quantized by the end
    x = torch.randint(0, 256, (1, 16))
    with torch.no_grad():
        assert torch.allclose(model(x), quantize(ref, "int8")(x), atol=1e-5)


def test_bad_combinations_are_one_line_errors(trained: tuple[Decoder, torch.Tensor, Path],
                                              tmp_path: Path) -> None:
    _, _, run = trained
    with pytest.raises(UserError, match="^quant: must be one of"):
        load_run(run, "cpu", "fp32", "int3")
    with pytest.raises(UserError, match="^quant: int8-dynamic .* --dtype fp32"):
        load_run(run, "cpu", "bf16", "int8-dynamic")
    enc = tmp_path / "enc"
    enc.mkdir()
    (enc / "config.yaml").write_text(yaml.safe_dump({"objective": "mlm", "encoder": {
        "vocab_size": 64, "block_size": 16, "n_layer": 1, "n_head": 2, "n_embd": 32}}))
    (enc / "tokenizer.json").write_text((run / "tokenizer.json").read_text())
    from lmforge.models.encoder import EncoderConfig, EncoderForMaskedLM

    save_checkpoint(enc, TrainState(step=1), EncoderForMaskedLM(EncoderConfig(
        vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=32)), None)
    with pytest.raises(UserError, match="^quant: quantizes decoder runs; .* drop --quant"):
        load_run(enc, "cpu", "fp32", "int8")


def test_int4_keeps_layers_narrower_than_a_group_in_float() -> None:
    """The documented fallback: a linear layer whose width is not a multiple of the int4
    group stays in floating point; the others are quantized."""
    cfg = DecoderConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_kv_head=1,
                        n_embd=INT4_GROUP, intermediate_size=INT4_GROUP * 3 // 2)
    model = Decoder(cfg)
    model.init_weights(torch.Generator().manual_seed(0))
    quantize(model, "int4")
    kinds = {name: type(m.weight).__name__ for name, m in model.named_modules()
             if isinstance(m, nn.Linear) and m is not model.lm_head}
    assert kinds["blocks.0.mlp.down_proj"] == "Parameter"  # in_features 96: not a multiple
    assert kinds["blocks.0.attn.q_proj"] != "Parameter"
    assert model(torch.tensor([[1, 2, 3]])).shape == (1, 3, 64)


def test_without_torchao_the_error_names_the_extra(trained: tuple[Decoder, torch.Tensor, Path],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torchao.quantization", None)  # import fails
    with pytest.raises(UserError, match=r"^quant: needs torchao .*lmforge\[quant\]"):
        load_run(trained[2], "cpu", "fp32", "int8")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("method", ("int8", "int4"))
def test_cuda_quantized_load_is_close_to_bf16(trained: tuple[Decoder, torch.Tensor, Path],
                                              method: str) -> None:
    _, val, run = trained
    x = val[: 2 * SEQ].view(2, SEQ)
    want = load_run(run, "cuda", "bf16").model
    got = load_run(run, "cuda", "bf16", method).model
    with torch.no_grad():
        a, b = want(x.cuda()).float(), got(x.cuda()).float()
    assert ((b - a).norm() / a.norm()).item() < LOGIT_BOUND[method] + 0.02


def test_every_inference_command_takes_quant(trained: tuple[Decoder, torch.Tensor, Path],
                                             tmp_path: Path, capsys: pytest.CaptureFixture,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    import io
    import json

    import lmforge
    from lmforge.cli import run as cli
    from lmforge.recipes import chat, eval, generate, serve

    run = str(trained[2])
    for recipe in (generate, chat, serve, eval):  # one option, from run.Placement
        assert recipe.Config.__dataclass_fields__["quant"].default == "none"
    assert cli(["generate", "--run", run, "--quant", "int8", "--prompt", "The",
                "--max_new_tokens", "4", "--greedy"]) == 0
    assert capsys.readouterr().out.startswith("The")
    text = tmp_path / "held_out.txt"
    text.write_text("The list of values is sorted in place. " * 8)
    assert cli(["eval", run, "--data", str(text), "--quant", "int4"]) == 0
    assert json.loads((trained[2] / "eval_held_out.json").read_text())["quant"] == "int4"
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\n/exit\n"))
    assert cli(["chat", "--run", run, "--quant", "int8-dynamic", "--template", "chatml",
                "--max_new_tokens", "3"]) == 0
    lm = lmforge.load(run, quant="int8", max_batch=1)
    assert isinstance(lm.generate("The", max_new_tokens=3, temperature=0), str)
    capsys.readouterr()
    assert cli(["generate", "--run", run, "--quant", "int8", "--dtype", "bf16",
                "--device", "cpu"]) == 0
    from lmforge.cli import main

    with pytest.raises(SystemExit) as exit_:  # refused before the server starts
        main(["serve", "--run", run, "--quant", "int8-dynamic", "--dtype", "bf16",
              "--device", "cpu", "--port", "8765"])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2
    assert "int8-dynamic" in err and "\n" not in err and "Traceback" not in err

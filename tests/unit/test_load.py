"""Loading a run for inference: weights streamed into a meta-built model, the decoding layout,
and a draft placed like its target."""

from __future__ import annotations

import weakref
from pathlib import Path

import pytest
import torch
import yaml

import lmforge.run as run_module
from lmforge.checkpoint import (
    TrainState,
    WeightReader,
    read_weights,
    save_checkpoint,
    stream_model_weights,
)
from lmforge.config import UserError, to_dict
from lmforge.models.decoder import Decoder, DecoderConfig
from lmforge.run import load_run
from tests.serve import make_tiny_run

TOKENIZER_RUN = "tiny"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_run(tmp_path_factory.mktemp("load"), block_size=64)


def write_run(root: Path, tokenizer_from: Path, name: str, saved_cfg: DecoderConfig,
              model: Decoder | None = None) -> Path:
    """A run folder whose config.yaml says ``saved_cfg`` and whose checkpoint holds ``model``
    (default: a model of that config), with ``tokenizer_from``'s tokenizer."""
    if model is None:
        model = Decoder(saved_cfg)
        model.init_weights(torch.Generator().manual_seed(0))
    run = root / name
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"model": to_dict(saved_cfg)}))
    (run / "tokenizer.json").write_bytes((tokenizer_from / "tokenizer.json").read_bytes())
    save_checkpoint(run, TrainState(step=1), model, None)
    return run


def config(**kw: object) -> DecoderConfig:
    base: dict[str, object] = dict(vocab_size=512, block_size=64, n_layer=8, n_head=4,
                                   n_kv_head=2, n_embd=64, init_std=0.3)
    return DecoderConfig(**{**base, **kw})  # type: ignore[arg-type]


def test_load_holds_the_weights_about_once(tiny_run: Path, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Tensor storage alive while loading (the model's materialized tensors plus every tensor
    read from the file and not yet dropped), sampled at each read: never above 1.2x the
    weights. Reading the file whole into an allocated model would hold 2x. Every tensor is read
    once (the tied head is stored and read once), the values are the file's, the head tied."""
    run = write_run(tmp_path, tiny_run, "deep", config())
    built: list[torch.nn.Module] = []
    read_back: list[weakref.ref[torch.Tensor]] = []
    peak = [0]

    def live_bytes() -> int:
        tensors = [*built[0].parameters(), *built[0].buffers(), *(r() for r in read_back)]
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                    for t in tensors if t is not None and not t.is_meta}
        return sum(storages.values())

    def spy_stream(path: Path, model: torch.nn.Module, device: torch.device) -> None:
        built.append(model)
        stream_model_weights(path, model, device)

    real_read = WeightReader.__call__

    def spy_read(self: WeightReader, name: str) -> torch.Tensor | None:
        tensor = real_read(self, name)
        if tensor is not None:
            read_back.append(weakref.ref(tensor))
        peak[0] = max(peak[0], live_bytes())
        return tensor

    monkeypatch.setattr(run_module, "stream_model_weights", spy_stream)
    monkeypatch.setattr(WeightReader, "__call__", spy_read)
    model = load_run(run).model
    assert isinstance(model, Decoder) and built == [model]
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    assert live_bytes() == weights + sum(b.numel() * b.element_size() for b in model.buffers())
    assert len(read_back) == len(list(model.parameters()))  # each once; the tied head too
    assert peak[0] <= 1.2 * weights, (peak[0], weights)
    assert model.lm_head.weight is model.tok_emb.weight
    file = read_weights(run)
    state = model.state_dict()
    assert state.keys() == file.keys() | {"lm_head.weight"}
    assert all(torch.equal(state[k], file[k]) for k in file)
    assert all(p.requires_grad for p in model.parameters())  # as a model built normally


def test_a_checkpoint_that_does_not_fit_is_one_line(tiny_run: Path, tmp_path: Path) -> None:
    """Missing, extra and misshaped tensors, and a tied pair stored with different values."""
    saved = config(n_layer=2)
    cases = [(config(n_layer=3), "blocks.2.* is in the model but not in the file"),
             (config(n_layer=1), "blocks.1.* is in the file but not in the model"),
             (config(n_layer=2, vocab_size=500), "has shape \\(512, 64\\) in the file but "
                                                 "\\(500, 64\\) in the model")]
    for i, (cfg, needle) in enumerate(cases):
        model = Decoder(saved)
        run = write_run(tmp_path, tiny_run, f"bad{i}", cfg, model)
        with pytest.raises(UserError, match=needle.replace("*", "[a-z_.]*")):
            load_run(run)
    untied = Decoder(config(n_layer=2, tie_embeddings=False))
    run = write_run(tmp_path, tiny_run, "untied", config(n_layer=2), untied)
    with pytest.raises(UserError, match="ties lm_head.weight to tok_emb.weight but the file "
                                        "holds different values"):
        load_run(run)


def test_one_row_loads_lay_fp32_weights_out_for_decoding(tiny_run: Path) -> None:
    """``rows=1`` (generate, chat): every nn.Linear weight column-major, logits of the plain
    load to 1e-5, the same state dict and the tied head still the embedding; more rows
    (the engine), bf16, or no decoding keep the row-major layout."""
    plain, one = load_run(tiny_run).model, load_run(tiny_run, rows=1).model
    assert isinstance(plain, Decoder) and isinstance(one, Decoder)
    linears = [m for m in one.modules() if isinstance(m, torch.nn.Linear)]
    assert all(m.weight.stride() == (1, m.weight.shape[0]) for m in linears)
    assert one.lm_head.weight is one.tok_emb.weight
    a, b = plain.state_dict(), one.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    idx = torch.randint(0, plain.cfg.vocab_size, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        torch.testing.assert_close(one(idx), plain(idx), rtol=0, atol=1e-5)
    for kw in ({"rows": 4}, {"rows": None}, {"rows": 1, "dtype": "bf16"}):
        model = load_run(tiny_run, **kw).model  # type: ignore[arg-type]
        assert all(p.is_contiguous() for p in model.parameters()), kw
    import lmforge  # the Python API (and `lmforge chat`, max_batch 1) take the same path

    assert column_major(lmforge.load(tiny_run, max_batch=1, device="cpu").model)
    assert not column_major(lmforge.load(tiny_run, max_batch=4, device="cpu").model)


def generate_text(run: Path, capsys: pytest.CaptureFixture, **kw: object) -> str:
    from lmforge.recipes import generate

    generate.main(generate.Config(run=str(run), prompt="The", max_new_tokens=10, greedy=True,
                                  device="cpu", **kw))  # type: ignore[arg-type]
    return str(capsys.readouterr().out)


def spy_loads(monkeypatch: pytest.MonkeyPatch, quantize: bool) -> list[tuple[str, str, object]]:
    """Record generate's (quant, run, rows) loads; load unquantized unless ``quantize``."""
    from lmforge.recipes import generate

    calls: list[tuple[str, str, object]] = []
    real = generate.load_model

    def spy(path: str, device: str, dtype: str, quant: str, *, rows: int | None = None):  # type: ignore[no-untyped-def]
        loaded = real(path, device, dtype, quant if quantize else "none", rows=rows)
        calls.append((quant, str(path), loaded.model))
        return loaded

    monkeypatch.setattr(generate, "load_model", spy)
    return calls


def column_major(model: object) -> bool:
    assert isinstance(model, Decoder)
    return model.blocks[0].attn.q_proj.weight.stride() == (1, model.cfg.n_embd)


def test_generate_passes_its_placement_to_the_draft(
        tiny_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture) -> None:
    """`generate --draft D --quant Q` loads D with --quant Q too (the loads are recorded, and
    done unquantized here: torchao's import is slow; the slow test below quantizes). The
    target decodes one row column-major alone, but checks k+1 positions per forward beside a
    draft: row-major then; the draft decodes one row."""
    calls = spy_loads(monkeypatch, quantize=False)
    draft = write_run(tmp_path, tiny_run, "draft", config(n_layer=1))
    plain = generate_text(tiny_run, capsys, quant="int8")
    assert generate_text(tiny_run, capsys, quant="int8", draft=str(draft)) == plain
    assert [(q, r) for q, r, _ in calls] == [("int8", str(tiny_run)), ("int8", str(tiny_run)),
                                             ("int8", str(draft))]
    assert [column_major(m) for _, _, m in calls] == [True, False, True]


@pytest.mark.slow  # torchao's import and quantization: ~20 s here
def test_generate_quantizes_the_draft_and_keeps_the_quantized_greedy_text(
        tiny_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture) -> None:
    """With int8 weight-only weights on both sides, speculative decoding gives the quantized
    target's greedy text, and no float nn.Linear weight is left in the draft. (Not so with
    int8-dynamic: its per-tensor activation scale makes a position's logits depend on the
    others fed with it, and the target checks k+1 drafted tokens at once.)"""
    pytest.importorskip("torchao")
    calls = spy_loads(monkeypatch, quantize=True)
    draft = write_run(tmp_path, tiny_run, "draft", config(n_layer=1))
    plain = generate_text(tiny_run, capsys, quant="int8")
    assert generate_text(tiny_run, capsys, quant="int8", draft=str(draft)) == plain
    model = calls[-1][2]
    assert isinstance(model, torch.nn.Module) and calls[-1][1] == str(draft)
    assert not [m for m in model.modules()
                if isinstance(m, torch.nn.Linear) and type(m.weight.data) is torch.Tensor]

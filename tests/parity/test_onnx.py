"""ONNX export, run by onnxruntime (a reference nobody here wrote) at shapes it was not traced
with: dynamic batch and sequence axes, and a KV cache fed back step by step."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from lmforge.checkpoint import TrainState, save_checkpoint  # noqa: E402
from lmforge.cli import run  # noqa: E402
from lmforge.config import UserError, to_dict  # noqa: E402
from lmforge.data.tokenizer import train_bpe  # noqa: E402
from lmforge.models.decoder import Decoder, DecoderConfig  # noqa: E402

TOL = 1e-4


def make_run(root: Path, **style: Any) -> tuple[Path, Decoder]:
    cfg = DecoderConfig(vocab_size=300, block_size=48, n_layer=2, n_head=4, n_embd=32,
                        init_std=0.2, **style)
    model = Decoder(cfg)
    model.init_weights(torch.Generator().manual_seed(0))
    save_checkpoint(root, TrainState(step=5), model, None)
    (root / "config.yaml").write_text(yaml.safe_dump({"model": to_dict(cfg)}))
    train_bpe(["the cat sat on the mat"] * 20, 300).save(str(root / "tokenizer.json"))
    return root, model.eval()


def ids(batch: int, length: int, seed: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 300, (batch, length), generator=g)


def test_gpt2_style_export_has_dynamic_batch_and_sequence(tmp_path: Path) -> None:
    run_dir, model = make_run(tmp_path / "run", pos="learned", norm="layernorm", mlp="gelu",
                              bias=True, tie_embeddings=False)
    out = tmp_path / "onnx"
    assert run(["export", "--run", str(run_dir), "--format", "onnx", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "model.onnx", "tokenizer.json"]
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    (inp,), (outp,) = session.get_inputs(), session.get_outputs()
    assert inp.name == "input_ids" and outp.name == "logits"
    assert all(isinstance(d, str) for d in inp.shape) and outp.shape[2] == 300
    for batch, length in ((1, 5), (4, 33), (3, 48)):
        x = ids(batch, length)
        got = torch.from_numpy(session.run(None, {"input_ids": x.numpy()})[0])
        with torch.no_grad():
            assert (got - model(x)).abs().max().item() <= TOL
    card = (out / "README.md").read_text()
    assert "onnxruntime" in card and "ort.InferenceSession" in card and "learned positions" in card


def test_kv_cache_export_decodes_step_by_step_like_a_full_forward(tmp_path: Path) -> None:
    run_dir, model = make_run(tmp_path / "run", n_kv_head=2, qkv_bias=True, sliding_window=6)
    out = tmp_path / "onnx"
    assert run(["export", "--run", str(run_dir), "--format", "onnx", "--kv_cache",
                "--out", str(out)]) == 0
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    assert names == ["input_ids", "past_key_values.0.key", "past_key_values.0.value",
                     "past_key_values.1.key", "past_key_values.1.value"]
    assert [o.name for o in session.get_outputs()][1] == "present.0.key"
    x = ids(3, 20)
    past = [np.zeros((3, 2, 0, 8), np.float32)] * 4
    logits = []
    for chunk in x.split([9, 1, 1, 9], dim=1):  # prefill, two single tokens, a chunk
        result = session.run(None, {"input_ids": chunk.numpy(), **dict(zip(names[1:], past))})
        logits.append(result[0])
        past = result[1:]
    assert past[0].shape == (3, 2, 20, 8)
    with torch.no_grad():
        full = model(x)  # the window (6) is shorter than the sequence: the mask matters
    assert (torch.from_numpy(np.concatenate(logits, axis=1)) - full).abs().max().item() <= TOL
    assert "past_key_values.0.key" in (out / "README.md").read_text()


def test_onnx_takes_no_dtype(tmp_path: Path) -> None:
    with pytest.raises(UserError) as err:
        run(["export", "--run", str(tmp_path), "--format", "onnx", "--dtype", "bfloat16",
             "--out", str(tmp_path / "o")])
    assert str(err.value).startswith("dtype:") and "\n" not in str(err.value)

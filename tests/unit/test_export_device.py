"""`lmforge export --device`: the run is opened on the device asked for (load_run, as every
inference command does), and the export is written and checked from the CPU, so its files do
not depend on the device."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from lmforge.checkpoint import TrainState, save_checkpoint
from lmforge.cli import command_help, run
from lmforge.config import to_dict
from lmforge.data.tokenizer import train_bpe
from lmforge.models.decoder import Decoder, DecoderConfig
from tests.smoke.helpers import assert_user_error, lmforge

WEIGHTS = {"hf": "model.safetensors", "gguf": "run.F32.gguf", "onnx": "model.onnx"}


def make_run(root: Path) -> Path:
    cfg = DecoderConfig(vocab_size=300, block_size=32, n_layer=2, n_head=4, n_kv_head=2,
                        n_embd=32, init_std=0.2)
    model = Decoder(cfg)
    model.init_weights(torch.Generator().manual_seed(0))
    save_checkpoint(root, TrainState(step=3), model, None)
    (root / "config.yaml").write_text(yaml.safe_dump({"model": to_dict(cfg)}))
    train_bpe(["the cat sat on the mat"] * 20, 300).save(str(root / "tokenizer.json"))
    return root


def export(run_dir: Path, out: Path, fmt: str, *device: str) -> bytes:
    extra = ["--gguf_type", "f32"] if fmt == "gguf" else []
    assert run(["export", "--run", str(run_dir), "--format", fmt, "--out", str(out), *extra,
                *device]) == 0
    return (out / WEIGHTS[fmt]).read_bytes()


def test_device_cpu_writes_the_files_of_the_default_device(tmp_path: Path) -> None:
    """--device auto is cuda where there is one: there this compares a GPU-opened export."""
    run_dir = make_run(tmp_path / "run")
    on_cpu = export(run_dir, tmp_path / "cpu", "hf", "--device", "cpu")
    assert on_cpu == export(run_dir, tmp_path / "auto", "hf")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without a GPU")
def test_device_cuda_without_a_gpu_is_one_line_and_writes_nothing(tmp_path: Path) -> None:
    run_dir, out = make_run(tmp_path / "run"), tmp_path / "out"
    proc = lmforge("export", "--run", str(run_dir), "--out", str(out), "--device", "cuda",
                   cwd=tmp_path)
    assert_user_error(proc, "device: cuda", "--device cpu")
    assert not out.exists()


def test_help_shows_the_device_default() -> None:
    from lmforge.recipes import export as recipe

    assert "  --device (str, default: auto)" in command_help("export", recipe).splitlines()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("fmt", ["hf", "gguf", "onnx"])
def test_an_export_opened_on_cuda_is_byte_identical_to_one_opened_on_cpu(
        fmt: str, tmp_path: Path) -> None:
    if fmt == "onnx":
        pytest.importorskip("onnxscript")
        pytest.importorskip("onnxruntime")
    run_dir = make_run(tmp_path / "run")
    assert (export(run_dir, tmp_path / "cuda", fmt, "--device", "cuda")
            == export(run_dir, tmp_path / "cpu", fmt, "--device", "cpu"))

"""Checkpoint round trips: bit-identical resume, atomicity, pointers, pruning, clear errors."""

from __future__ import annotations

import json
import random
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from lmforge import checkpoint as ckpt_mod
from lmforge.checkpoint import (
    TrainState,
    latest_checkpoint,
    load_checkpoint,
    load_model_weights,
    read_meta,
    save_checkpoint,
)
from lmforge.config import UserError


class TinyLM(nn.Module):
    """Embedding -> block -> tied head, with dropout so the RNG matters in forward."""

    def __init__(self, vocab: int = 17, width: int = 8) -> None:
        super().__init__()
        self.tok_emb = nn.Embedding(vocab, width)
        self.block = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Dropout(0.2))
        self.norm = nn.LayerNorm(width)
        self.lm_head = nn.Linear(width, vocab, bias=False)
        self.lm_head.weight = self.tok_emb.weight  # weight tying
        self.register_buffer("scale", torch.tensor(0.5))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok_emb(idx)  # (B, T, C)
        return self.lm_head(self.norm(x + self.scale * self.block(x)))  # (B, T, V)


def make(
    seed: int = 0, width: int = 8, lr: float = 1e-2, device: str = "cpu"
) -> tuple[TinyLM, torch.optim.AdamW]:
    torch.manual_seed(seed)
    model = TinyLM(width=width).to(device)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr, betas=(0.9, 0.95),
    )
    return model, opt


def train_steps(model: nn.Module, opt: torch.optim.Optimizer, n: int) -> None:
    """n AdamW steps on batches drawn from the global torch RNG (dropout draws from it too)."""
    model.train()
    for _ in range(n):
        idx = torch.randint(0, 17, (4, 6))
        logits = model(idx)
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), idx.roll(-1, 1).flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def flat_opt_tensors(opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    return {f"{i}.{k}": v for i, s in opt.state_dict()["state"].items()
            for k, v in s.items() if isinstance(v, torch.Tensor)}


def save_simple(run: Path, step: int, best: float | None = None, keep_last: int = 3) -> Path:
    model, opt = make()
    return save_checkpoint(run, TrainState(step=step, tokens=step * 24, best_val_loss=best),
                           model, opt, keep_last=keep_last)


@pytest.fixture()
def trained(tmp_path: Path) -> tuple[TinyLM, torch.optim.AdamW, Path]:
    model, opt = make(seed=0)
    train_steps(model, opt, 3)
    path = save_checkpoint(tmp_path, TrainState(step=3, tokens=72, best_val_loss=2.5), model, opt,
                           info={"val_loss": 2.5, "note": "x"})
    return model, opt, path


def test_round_trip_is_bit_identical(trained: tuple) -> None:
    model, opt, path = trained
    fresh, fresh_opt = make(seed=123, lr=5e-4)  # different init and hyperparameters
    state, extra, info = load_checkpoint(path, fresh, fresh_opt)
    assert state == TrainState(step=3, tokens=72, best_val_loss=2.5)
    assert info == {"val_loss": 2.5, "note": "x"} and extra == {}
    assert fresh.state_dict().keys() == model.state_dict().keys()
    for k, v in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k
    assert fresh.lm_head.weight is fresh.tok_emb.weight  # the tie survives loading
    a, b = flat_opt_tensors(opt), flat_opt_tensors(fresh_opt)
    assert a.keys() == b.keys() and len(a) > 0
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    assert fresh_opt.param_groups[0]["lr"] == 1e-2
    assert fresh_opt.param_groups[0]["betas"] == (0.9, 0.95)
    assert [g["weight_decay"] for g in fresh_opt.param_groups] == [0.1, 0.0]


def test_resume_continues_bit_identically(trained: tuple) -> None:
    model, opt, path = trained
    train_steps(model, opt, 2)  # the uninterrupted run (batches + dropout from the global RNG)
    torch.manual_seed(999)  # scramble the RNG: the restore must bring it back
    fresh, fresh_opt = make(seed=7)
    load_checkpoint(path, fresh, fresh_opt)
    train_steps(fresh, fresh_opt, 2)
    for k, v in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k
    for k, v in flat_opt_tensors(opt).items():
        assert torch.equal(flat_opt_tensors(fresh_opt)[k], v), k


def test_rng_states_are_restored(tmp_path: Path) -> None:
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    np.random.randn()  # leaves a cached gaussian in numpy's legacy state
    random.gauss(0, 1)  # and in Python's
    model, _ = make()
    path = save_checkpoint(tmp_path, TrainState(step=1), model, None)
    expected = (torch.rand(5), np.random.randn(5), random.gauss(0, 1), random.random())
    torch.manual_seed(10)
    np.random.seed(11)
    random.seed(12)
    load_checkpoint(path, make()[0])
    got = (torch.rand(5), np.random.randn(5), random.gauss(0, 1), random.random())
    assert torch.equal(got[0], expected[0])
    assert np.array_equal(got[1], expected[1])
    assert got[2:] == expected[2:]
    fresh = make()[0]  # make() seeds torch itself, so build before seeding
    torch.manual_seed(10)
    _, _, _ = load_checkpoint(path, fresh, restore_rng=False)
    untouched = torch.rand(5)
    torch.manual_seed(10)
    assert torch.equal(untouched, torch.rand(5))


def test_extra_tensors_round_trip(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(5)
    torch.randperm(100, generator=gen)
    base = torch.arange(10.0)
    extra = {"loader.generator": gen.get_state(), "loader.pos": torch.tensor([3, 41]),
             "half": torch.ones(3, dtype=torch.bfloat16), "view_a": base[:6], "view_b": base[4:]}
    model, _ = make()
    path = save_checkpoint(tmp_path, TrainState(step=2), model, None, extra=extra)
    _, got, _ = load_checkpoint(path, make()[0])
    assert got.keys() == extra.keys()
    for k, v in extra.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v), k
    resumed = torch.Generator()
    resumed.set_state(got["loader.generator"])
    assert torch.equal(torch.randperm(100, generator=resumed), torch.randperm(100, generator=gen))


def test_layout_and_no_pickle(trained: tuple, tmp_path: Path, monkeypatch) -> None:
    _, _, path = trained
    assert path == tmp_path / "checkpoints" / "step_00000003"
    assert sorted(p.name for p in path.iterdir()) == [
        "meta.json", "model.safetensors", "optimizer.safetensors", "rng.safetensors"]
    assert (tmp_path / "latest").read_text().strip() == "step_00000003"
    for f in [*path.iterdir(), tmp_path / "latest", tmp_path / "best"]:
        data = f.read_bytes()
        assert not data.startswith(b"\x80"), f"{f} looks like a pickle"
        assert b"PK\x03\x04" not in data[:4], f"{f} looks like a torch zip archive"
        if f.suffix == ".safetensors":
            (n,) = struct.unpack("<Q", data[:8])
            header = json.loads(data[8:8 + n])  # the safetensors header is plain JSON
            assert isinstance(header, dict)
        elif f.suffix == ".json":
            json.loads(data)
        else:
            assert data.decode().strip().startswith("step_")
    meta = read_meta(path)
    assert meta["format_version"] == 1 and meta["step"] == 3 and meta["tokens"] == 72
    assert "state.0.exp_avg" in json.dumps(meta["optimizer"])

    def no_torch_load(*a, **k):
        raise AssertionError("torch.load must not be used")

    monkeypatch.setattr(torch, "load", no_torch_load)
    load_checkpoint(path, *make())


def test_tied_weight_saved_once(trained: tuple) -> None:
    _, _, path = trained
    from safetensors import safe_open

    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
        meta = json.loads(f.metadata()["lmforge"])
    assert len(keys & {"tok_emb.weight", "lm_head.weight"}) == 1
    assert set(meta["aliases"]) | keys >= {"tok_emb.weight", "lm_head.weight"}


def test_untied_file_into_tied_model_is_refused(tmp_path: Path) -> None:
    model, _ = make()
    model.lm_head.weight = nn.Parameter(model.tok_emb.weight.detach() + 1)  # untie
    path = save_checkpoint(tmp_path, TrainState(step=1), model, None)
    with pytest.raises(UserError, match="ties"):
        load_model_weights(path, make()[0])


def test_compiled_module_loads_into_plain(tmp_path: Path) -> None:
    model, opt = make(seed=3)
    compiled = torch.compile(model, backend="eager")
    model.block = torch.compile(model.block, backend="eager")  # per-block compile: inner prefix
    assert any("_orig_mod." in k for k in compiled.state_dict())
    path = save_checkpoint(tmp_path, TrainState(step=1), compiled, opt)
    from safetensors import safe_open

    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        names = f.keys()
    assert not any("_orig_mod" in k for k in names)
    plain, plain_opt = make(seed=4)
    load_checkpoint(path, plain, plain_opt)
    for k, v in ckpt_mod.unwrap_model(model).state_dict().items():
        assert torch.equal(plain.state_dict()[k.replace("_orig_mod.", "")], v), k
    # ...and back into a compiled module.
    again = torch.compile(make(seed=5)[0], backend="eager")
    load_model_weights(path, again)
    assert torch.equal(again._orig_mod.tok_emb.weight, model.tok_emb.weight)


def test_module_prefix_from_other_tools_is_stripped(tmp_path: Path) -> None:
    model, _ = make(seed=3)
    path = save_checkpoint(tmp_path, TrainState(step=1), model, None)
    from safetensors.torch import save_file

    sd = {f"module.{k}": v.clone() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(sd, str(path / "model.safetensors"))
    plain = make(seed=4)[0]
    load_model_weights(path, plain)
    assert torch.equal(plain.tok_emb.weight, model.tok_emb.weight)


def test_shape_mismatch_names_tensor_and_shapes(trained: tuple) -> None:
    _, _, path = trained
    with pytest.raises(UserError) as e:
        load_checkpoint(path, *make(width=16))
    msg = str(e.value)
    assert str(path) in msg and "tok_emb.weight" in msg
    assert "(17, 8) in the file but (17, 16) in the model" in msg and "--model" in msg


def test_missing_and_unexpected_keys(trained: tuple) -> None:
    _, _, path = trained
    bigger = make()[0]
    bigger.extra_proj = nn.Linear(8, 8)
    with pytest.raises(UserError, match=r"tensor extra_proj.weight is in the model but not in"):
        load_model_weights(path, bigger)
    smaller = make()[0]
    del smaller.norm
    with pytest.raises(UserError, match=r"tensor norm\.(weight|bias) is in the file but not in the model"):
        load_model_weights(path, smaller)


def test_mismatch_leaves_model_untouched(trained: tuple) -> None:
    _, _, path = trained
    model, opt = make(seed=9)
    opt = torch.optim.AdamW(model.parameters())  # one group instead of two
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UserError, match="parameter groups"):
        load_checkpoint(path, model, opt)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_load_model_weights_from_run_dir(trained: tuple, tmp_path: Path) -> None:
    model, _, _ = trained
    fresh = make(seed=42)[0]
    load_model_weights(tmp_path, fresh)
    assert torch.equal(fresh.norm.weight, model.norm.weight)
    with pytest.raises(UserError, match="no complete checkpoint"):
        load_model_weights(tmp_path / "checkpoints", fresh)
    with pytest.raises(UserError, match="does not exist"):
        load_model_weights(tmp_path / "nope", fresh)


def test_latest_ignores_incomplete_dirs(tmp_path: Path) -> None:
    assert latest_checkpoint(tmp_path) is None
    good = save_simple(tmp_path, 5)
    root = tmp_path / "checkpoints"
    shutil.copytree(good, root / ".step_00000009.abc123.tmp")  # leftover of a crashed save
    shutil.copytree(good, root / "step_00000007")
    (root / "step_00000007" / "meta.json").write_text('{"format": "lmforge-checkp')  # truncated
    shutil.copytree(good, root / "step_00000008")
    (root / "step_00000008" / "meta.json").unlink()
    shutil.copytree(good, root / "step_00000006")
    (root / "step_00000006" / "rng.safetensors").unlink()
    (tmp_path / "latest").unlink()
    assert latest_checkpoint(tmp_path) == good
    with pytest.raises(UserError, match="meta.json"):
        read_meta(root / "step_00000007")


def test_latest_pointer_and_fallback(tmp_path: Path) -> None:
    s1, s2 = save_simple(tmp_path, 1), save_simple(tmp_path, 2)
    assert latest_checkpoint(tmp_path) == s2
    (tmp_path / "latest").write_text("step_00000001\n")  # the pointer wins over the newest dir
    assert latest_checkpoint(tmp_path) == s1
    (tmp_path / "latest").write_text("step_00000099\n")  # dangling pointer
    assert latest_checkpoint(tmp_path) == s2
    (tmp_path / "latest").write_text("../../etc\n")  # never leaves the run dir
    assert latest_checkpoint(tmp_path) == s2


def test_keep_last_prunes_but_keeps_best(tmp_path: Path) -> None:
    losses = [3.0, 2.0, 2.0, 2.5, None, 2.0]  # the running best as the loop records it
    for step, loss in enumerate(losses, start=1):
        save_simple(tmp_path, step, best=loss, keep_last=2)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step_00000002", "step_00000005", "step_00000006"]
    assert (tmp_path / "best").read_text().strip() == "step_00000002"
    save_simple(tmp_path, 7, best=1.5, keep_last=2)  # a new best releases the old one
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step_00000006", "step_00000007"]
    assert (tmp_path / "best").read_text().strip() == "step_00000007"


def test_explicit_is_best_and_overwrite(tmp_path: Path) -> None:
    model, opt = make()
    save_checkpoint(tmp_path, TrainState(step=4, best_val_loss=9.0), model, opt, is_best=False)
    assert not (tmp_path / "best").exists()
    path = save_checkpoint(tmp_path, TrainState(step=4, tokens=1), model, opt, info={"v": 2})
    assert read_meta(path)["info"] == {"v": 2} and read_meta(path)["tokens"] == 1


def test_failed_save_leaves_nothing(tmp_path: Path, monkeypatch) -> None:
    first = save_simple(tmp_path, 1)

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(ckpt_mod, "_rng_snapshot", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        save_simple(tmp_path, 2)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_00000001"]
    assert latest_checkpoint(tmp_path) == first
    with pytest.raises(TypeError):  # info must be JSON-able; checked before anything is written
        save_checkpoint(tmp_path, TrainState(step=3), make()[0], None, info={"x": object()})
    assert latest_checkpoint(tmp_path) == first


def test_weights_only_checkpoint_cannot_resume(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path, TrainState(step=1), make()[0], None)
    with pytest.raises(UserError, match="without optimizer state"):
        load_checkpoint(path, *make())



@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_round_trip(tmp_path: Path) -> None:
    model, opt = make(seed=0, device="cuda")
    for _ in range(2):
        model(torch.randint(0, 17, (4, 6), device="cuda")).float().mean().backward()
        opt.step()
        opt.zero_grad()
    path = save_checkpoint(tmp_path, TrainState(step=2), model, opt)
    expected = torch.rand(5, device="cuda")
    fresh, fresh_opt = make(seed=1, device="cuda")
    torch.cuda.manual_seed_all(999)
    load_checkpoint(path, fresh, fresh_opt)
    assert torch.equal(torch.rand(5, device="cuda"), expected)  # CUDA RNG restored
    assert fresh.lm_head.weight is fresh.tok_emb.weight
    for k, v in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k
    for k, v in flat_opt_tensors(opt).items():
        got = flat_opt_tensors(fresh_opt)[k]
        assert got.device == v.device and torch.equal(got, v), k

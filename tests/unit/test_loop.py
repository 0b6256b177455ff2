"""The one training loop: accumulation, non-finite steps, divergence, early stopping."""

from __future__ import annotations

import itertools

import pytest
import torch
from rich.console import Console
from torch import nn

from lmforge.checkpoint import TrainState
from lmforge.config import OptimConfig, TrainConfig
from lmforge.train.loop import LoopHooks, Runtime, TrainingDiverged, train
from lmforge.train.losses import causal_lm_loss
from lmforge.train.optim import build_optimizer
from lmforge.utils.logging import RunLogger


class TinyLM(nn.Module):
    def __init__(self, vocab: int = 17, dim: int = 8) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(vocab, dim)
        self.out = nn.Linear(dim, vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.emb(x)))


def _data(n: int, batch: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    seqs = torch.randint(0, 17, (n * batch, 9), generator=g)
    return [(s[:, :-1], s[:, 1:]) for s in seqs.split(batch)]


def _run(model, batches, cfg, loss_fn=None, hooks=None, tmp_path=None):
    optim_cfg = OptimConfig(lr=1e-2, warmup_steps=0)
    opt = build_optimizer(model, optim_cfg)
    log = RunLogger(tmp_path / "m.jsonl" if tmp_path else None, cfg.max_steps,
                    Console(quiet=True))
    with log:
        return train(model, opt, iter(batches), loss_fn or causal_lm_loss(), cfg, optim_cfg,
                     TrainState(), log, hooks or LoopHooks())


def test_grad_accumulation_equals_one_big_batch():
    big = _data(3, 4)
    small = [(x[i : i + 2], y[i : i + 2]) for x, y in big for i in (0, 2)]
    a, b = TinyLM(), TinyLM()
    _run(a, big, TrainConfig(max_steps=3, batch_size=4, grad_accum=1))
    _run(b, small, TrainConfig(max_steps=3, batch_size=2, grad_accum=2))
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)


def test_non_finite_step_is_skipped_and_counted(tmp_path):
    calls = itertools.count()
    base = causal_lm_loss()

    def sometimes_nan(model, x, y):
        total, count = base(model, x, y)
        return (total * float("nan") if next(calls) == 1 else total), count

    model = TinyLM()
    before = [p.detach().clone() for p in model.parameters()]
    state = _run(model, _data(4, 2), TrainConfig(max_steps=4, log_every=1),
                 loss_fn=sometimes_nan, tmp_path=tmp_path)
    assert state.step == 4
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
    lines = (tmp_path / "m.jsonl").read_text().splitlines()
    assert sum('"kind": "skip"' in line for line in lines) == 1


def test_diverging_run_stops_with_a_clear_error():
    def always_nan(model, x, y):
        total, count = causal_lm_loss()(model, x, y)
        return total * float("nan"), count

    with pytest.raises(TrainingDiverged, match="3 steps in a row"):
        _run(TinyLM(), _data(10, 2), TrainConfig(max_steps=10, max_bad_steps=3),
             loss_fn=always_nan)


def test_early_stopping_on_patience():
    losses = iter([1.0, 0.9, 0.95, 0.97, 0.99, 0.5])
    saved = []
    hooks = LoopHooks(evaluate=lambda m: {"val_loss": next(losses)},
                      save=lambda st, metrics: saved.append(st.step))
    state = _run(TinyLM(), _data(20, 2),
                 TrainConfig(max_steps=20, eval_every=2, save_every=100, early_stop_patience=3),
                 hooks=hooks)
    assert state.step == 10  # evals at 2, 4, 6, 8, 10: no improvement after step 4 for 3 evals
    assert state.best_val_loss == 0.9
    assert saved == [10]


def test_tensorboard_events_are_readable_by_tensorboard(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from lmforge.utils.trackers import make_trackers

    cfg = TrainConfig(max_steps=4, log_every=2)
    optim_cfg = OptimConfig(lr=1e-2, warmup_steps=0)
    model = TinyLM()
    trackers = make_trackers(["tensorboard"], tmp_path, "t", {})
    with RunLogger(tmp_path / "m.jsonl", 4, Console(quiet=True), trackers=trackers) as log:
        train(model, build_optimizer(model, optim_cfg), iter(_data(4, 2)), causal_lm_loss(),
              cfg, optim_cfg, TrainState(), log, LoopHooks())
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    losses = acc.Scalars("train/loss")
    assert [e.step for e in losses] == [2, 4]
    assert all(e.value > 0 for e in losses)


def _masked_rows(seed: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """4 rows whose labelled-token counts differ a lot (1, 2, 6 and 8 of 8): chat-style masks."""
    g = torch.Generator().manual_seed(seed)
    seqs = torch.randint(0, 17, (4, 9), generator=g)
    x, y = seqs[:, :-1].clone(), seqs[:, 1:].clone()
    for row, keep in enumerate((1, 2, 6, 8)):
        y[row, : 8 - keep] = -100
    return [(x[i : i + 1], y[i : i + 1]) for i in range(4)]


def test_masked_labels_accumulation_4x1_equals_1x4():
    rows = _masked_rows()
    whole = [(torch.cat([x for x, _ in rows]), torch.cat([y for _, y in rows]))] * 2
    a, b = TinyLM(), TinyLM()
    _run(a, whole, TrainConfig(max_steps=2, batch_size=4, grad_accum=1))
    _run(b, rows * 2, TrainConfig(max_steps=2, batch_size=1, grad_accum=4))
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)
    # the old per-micro-batch mean weighs the 1-token row like the 8-token one: it differs
    c = TinyLM()

    def per_batch_mean(model, x, y):
        total, count = causal_lm_loss()(model, x, y)
        return total / count * 8, torch.tensor(8)

    _run(c, rows * 2, TrainConfig(max_steps=2, batch_size=1, grad_accum=4), loss_fn=per_batch_mean)
    assert any(not torch.allclose(pa, pc, atol=1e-4) for pa, pc in zip(a.parameters(),
                                                                       c.parameters()))


def _two_rank_worker(rank: int, port: int, out: str) -> None:
    import os

    from lmforge.parallel import apply_ddp
    from lmforge.utils.dist import DistInfo

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    try:
        rows = _masked_rows()
        mine = [rows[rank * 2 + i] for i in range(2)] * 2  # rank 0: 1+2 tokens, rank 1: 6+8
        model = TinyLM()
        wrapped = apply_ddp(model, "cpu")
        optim_cfg = OptimConfig(lr=1e-2, warmup_steps=0)
        cfg = TrainConfig(max_steps=2, batch_size=1, grad_accum=2)
        with RunLogger(None, 2, Console(quiet=True), enabled=rank == 0) as log:
            train(wrapped, build_optimizer(model, optim_cfg), iter(mine), causal_lm_loss(), cfg,
                  optim_cfg, TrainState(), log, LoopHooks(),
                  Runtime(dist=DistInfo(rank=rank, world_size=2, launched=True)))
        if rank == 0:
            torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, out)
    finally:
        torch.distributed.destroy_process_group()


def test_two_ranks_equal_one_process_with_masked_labels(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "rank0.pt")
    mp.spawn(_two_rank_worker, args=(port, out), nprocs=2, join=True)
    rows = _masked_rows()
    one = TinyLM()
    _run(one, rows * 2, TrainConfig(max_steps=2, batch_size=1, grad_accum=4))
    two = torch.load(out, weights_only=True)
    for name, p in one.state_dict().items():
        torch.testing.assert_close(two[name], p, rtol=1e-5, atol=1e-6)

"""Preference tuning: the four losses against their papers' formulas written out with Python's
math on fixed log-probs, sequence log-probs against log_softmax, the frozen reference (LoRA:
adapters off is the base, whose weights never move; full: precomputed log-probs), the loop's
metrics, and the data rules (which tokens are the reply, which rows are errors)."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from lmforge.checkpoint import TrainState
from lmforge.config import OptimConfig, TrainConfig
from lmforge.data.preference import (
    check_preference,
    collate,
    encode_reply,
    preference_batches,
    with_reference,
)
from lmforge.models.decoder import Decoder, DecoderConfig
from lmforge.models.lora import adapters_disabled, apply_lora, lora_modules
from lmforge.train.loop import LoopHooks, train
from lmforge.train.losses import (
    PreferenceConfig,
    dpo_loss,
    ipo_loss,
    orpo_loss,
    preference_loss,
    sequence_logps,
    simpo_loss,
)
from lmforge.utils.logging import RunLogger
from tests.unit.test_sft import EOT, chatml, word_tokenizer

# fixed log-probs of 3 pairs: (chosen, rejected) under the policy and the reference, and the
# replies' token counts
PI_C, PI_R = [-4.0, -9.5, -2.25], [-6.5, -3.0, -2.0]
REF_C, REF_R = [-5.0, -8.0, -2.5], [-6.0, -4.0, -1.5]
LEN_C, LEN_R = [2, 5, 1], [3, 2, 2]


def _t(values: list[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def _log_sigmoid(z: float) -> float:
    return -math.log(1 + math.exp(-z))


def test_dpo_equals_the_papers_formula() -> None:
    beta = 0.3
    loss, r_c, r_r = dpo_loss(_t(PI_C), _t(PI_R), _t(REF_C), _t(REF_R), beta)
    for i in range(3):  # Rafailov et al. 2023, eq. 7
        want = -_log_sigmoid(beta * math.log(math.exp(PI_C[i]) / math.exp(REF_C[i]))
                             - beta * math.log(math.exp(PI_R[i]) / math.exp(REF_R[i])))
        assert float(loss[i]) == pytest.approx(want, rel=1e-12)
        assert float(r_c[i]) == pytest.approx(beta * (PI_C[i] - REF_C[i]))
        assert float(r_r[i]) == pytest.approx(beta * (PI_R[i] - REF_R[i]))


def test_ipo_equals_the_papers_formula() -> None:
    tau = 0.25
    loss, _, _ = ipo_loss(_t(PI_C), _t(PI_R), _t(REF_C), _t(REF_R), tau)
    for i in range(3):  # Azar et al. 2023, eq. 17: (h - 1/(2 tau))^2
        h = math.log(math.exp(PI_C[i]) * math.exp(REF_R[i])
                     / (math.exp(PI_R[i]) * math.exp(REF_C[i])))
        assert float(loss[i]) == pytest.approx((h - 1 / (2 * tau)) ** 2, rel=1e-12)


def test_orpo_equals_the_papers_formula() -> None:
    lam = 0.2
    mean_c = [p / n for p, n in zip(PI_C, LEN_C)]
    mean_r = [p / n for p, n in zip(PI_R, LEN_R)]
    loss, _, _ = orpo_loss(_t(mean_c), _t(mean_r), lam)
    for i in range(3):  # Hong et al. 2024, eq. 4-7: P = exp(mean log-prob), odds = P / (1 - P)
        p_c, p_r = math.exp(mean_c[i]), math.exp(mean_r[i])
        ratio = (p_c / (1 - p_c)) / (p_r / (1 - p_r))
        want = -mean_c[i] - lam * math.log(1 / (1 + 1 / ratio))
        assert float(loss[i]) == pytest.approx(want, rel=1e-12)


def test_simpo_equals_the_papers_formula() -> None:
    beta, gamma = 2.0, 0.5
    mean_c = [p / n for p, n in zip(PI_C, LEN_C)]
    mean_r = [p / n for p, n in zip(PI_R, LEN_R)]
    loss, _, _ = simpo_loss(_t(mean_c), _t(mean_r), beta, gamma)
    for i in range(3):  # Meng et al. 2024, eq. 6
        z = beta / LEN_C[i] * PI_C[i] - beta / LEN_R[i] * PI_R[i] - gamma
        assert float(loss[i]) == pytest.approx(-_log_sigmoid(z), rel=1e-12)


def test_sequence_logps_sums_the_labelled_tokens() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 7, generator=g, dtype=torch.float64)
    labels = torch.tensor([[-100, 3, 1, -100, -100], [-100, -100, 6, 0, 2]])
    got, n = sequence_logps(logits, labels)
    logp = logits.log_softmax(-1)
    want = [logp[0, 1, 3] + logp[0, 2, 1], logp[1, 2, 6] + logp[1, 3, 0] + logp[1, 4, 2]]
    torch.testing.assert_close(got, torch.stack(want).float(), rtol=1e-6, atol=1e-6)
    assert n.tolist() == [2, 3]


def tiny(seed: int = 0) -> Decoder:
    cfg = DecoderConfig(vocab_size=53, block_size=32, n_layer=2, n_head=4, n_kv_head=2, n_embd=32)
    model = Decoder(cfg)
    model.init_weights(torch.Generator().manual_seed(seed))
    return model


def _pairs(n: int = 8, seed: int = 1) -> list[tuple[torch.Tensor, ...]]:
    """Token pairs: a shared 6-token prompt, then a chosen and a rejected 3-token reply."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        prompt = torch.randint(0, 53, (6,), generator=g)
        chosen, rejected = torch.randint(0, 53, (2, 4), generator=g)
        pair: list[torch.Tensor] = []
        for reply in (chosen, rejected):
            ids = torch.cat([prompt, reply])
            y = ids[1:].clone()
            y[:5] = -100  # the reply's tokens only
            pair += [ids[:-1], y]
        out.append(tuple(pair))
    return out


def _train(model: nn.Module, kind: str, pairs: list, steps: int, tmp_path: Path) -> list[dict]:
    batches = preference_batches(pairs, 4, 32, 0, seed=0)
    cfg = TrainConfig(max_steps=steps, batch_size=4, log_every=1, eval_every=1000,
                      save_every=1000, trackers=[])
    optim = OptimConfig(lr=3e-2, warmup_steps=0, weight_decay=0.0)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=optim.lr)
    log_path = tmp_path / f"{kind}.jsonl"
    with RunLogger(log_path, steps, console=None, enabled=True) as log:  # type: ignore[arg-type]
        train(model, opt, batches, preference_loss(kind, PreferenceConfig()), cfg,  # type: ignore[arg-type]
              optim, TrainState(), log, LoopHooks())
    return [json.loads(line) for line in log_path.read_text().splitlines()]


def test_lora_reference_is_the_base_and_stays_fixed(tmp_path: Path) -> None:
    base, model = tiny(), tiny()
    apply_lora(model, 4, 8.0, 0.0, ["q_proj", "v_proj"])
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    pairs = _pairs()
    ids = collate(pairs, 0)[0][0]
    records = _train(model, "dpo", pairs, 12, tmp_path)
    adapters = lora_modules(model).values()
    assert all(float(m.lora_B.detach().abs().max()) > 0 for m in adapters)  # the policy moved
    assert not torch.equal(model(ids), base(ids))
    with adapters_disabled(model):  # ... and switched off it is the base, exactly
        torch.testing.assert_close(model(ids), base(ids), rtol=0, atol=0)
    assert not any(m.disabled for m in adapters)
    for n, p in model.named_parameters():  # the base weights never moved
        if not p.requires_grad:
            assert torch.equal(p, frozen[n]), n
    # the loop logged DPO's metrics, and the training pairs became separable
    first, last = records[0], records[-1]
    assert first["reward_margin"] == 0.0 and first["loss"] == pytest.approx(math.log(2))
    assert last["reward_accuracy"] == 1.0 and last["reward_margin"] > 0
    assert last["loss"] < first["loss"]
    assert {"logps_chosen", "logps_rejected", "choice_accuracy"} <= last.keys()


def test_full_method_reference_is_precomputed_once(tmp_path: Path) -> None:
    model = tiny()
    base = copy.deepcopy(model)
    pairs = _pairs()

    def logps(chunk: list) -> torch.Tensor:
        (ids, labels, _), _ = collate(chunk, 0)
        with torch.no_grad():
            return sequence_logps(model(ids), labels)[0]

    with_ref = with_reference(pairs, logps, batch_size=3)
    stored = torch.stack([p[4] for p in with_ref]).clone()
    _train(model, "dpo", with_ref, 6, tmp_path)
    (ids, labels, ref), _ = collate(with_ref, 0)
    base_logps = sequence_logps(base(ids), labels)[0]
    # the batches carry the base's log-probs, unchanged by training; the policy's moved
    torch.testing.assert_close(ref, base_logps.detach(), rtol=1e-5, atol=1e-5)
    assert torch.equal(torch.stack([p[4] for p in with_ref]), stored)
    assert not torch.allclose(sequence_logps(model(ids), labels)[0], base_logps)


@pytest.mark.parametrize("kind", ["ipo", "orpo", "simpo"])
def test_other_losses_train_through_the_loop(kind: str, tmp_path: Path) -> None:
    model = tiny()
    apply_lora(model, 4, 8.0, 0.0, ["q_proj", "v_proj"])
    records = _train(model, kind, _pairs(), 10, tmp_path)
    assert records[-1]["loss"] < records[0]["loss"]
    assert records[-1]["reward_margin"] > records[0]["reward_margin"]


def test_bf16_autocast_dpo_matches_fp32() -> None:
    model = tiny()
    apply_lora(model, 4, 8.0, 0.0, ["q_proj", "v_proj"])
    for m in lora_modules(model).values():
        nn.init.normal_(m.lora_B, std=0.05, generator=torch.Generator().manual_seed(0))
    x, y = collate(_pairs(), 0)
    loss_fn = preference_loss("dpo", PreferenceConfig())
    full, n, _ = loss_fn(model, x, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        half, _, _ = loss_fn(model, x, y)
    assert int(n) == 8 and half.dtype == torch.float32
    assert float(half) == pytest.approx(float(full.detach()), rel=0.05)


# --------------------------------------------------------------------------- data


def test_reply_tokens_are_the_last_assistant_turn_and_its_end() -> None:
    prompt = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
              {"role": "user", "content": "bye"}]
    enc = encode_reply(prompt, "ok there", chatml(), word_tokenizer(), EOT)
    # ... <|im_start|> assistant hello <|im_end|> ... <|im_start|> assistant ok there <|im_end|> \n
    marked = [i for i, m in zip(enc.ids, enc.mask) if m]
    assert marked == [9, 7, 1]  # ok there <|im_end|>; the earlier "hello" carries no loss


def test_bad_rows_are_errors_by_file_and_line(tmp_path: Path) -> None:
    rows = [
        {"prompt": "hi", "chosen": "hello", "rejected": "bye"},  # good
        {"prompt": "hi", "chosen": "  ", "rejected": "bye"},
        {"prompt": "hi", "chosen": "ok", "rejected": "ok"},
        {"prompt": "hi", "chosen": "ok"},
        {"prompt": [{"role": "assistant", "content": "hi"}], "chosen": "ok", "rejected": "bye"},
        {"prompt": " ".join(["hi"] * 40), "chosen": "ok", "rejected": "bye"},  # cut away
        {"prompt": [{"role": "user", "content": "hi"}],
         "chosen": [{"role": "assistant", "content": "ok"}], "rejected": "bye there"},  # good
    ]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "{not json\n")
    report = check_preference(path, word_tokenizer(), chatml(), EOT, max_len=24)
    assert len(report.pairs) == 2 and report.rows == 8
    errors = dict(e.split(": ", 1) for e in report.errors)
    assert sorted(errors) == [f"{path}:{n}" for n in (2, 3, 4, 5, 6, 8)]
    assert "'chosen' is empty" in errors[f"{path}:2"]
    assert "identical" in errors[f"{path}:3"]
    assert "'rejected'" in errors[f"{path}:4"]
    assert "role order" in errors[f"{path}:5"]
    assert "cuts all of it" in errors[f"{path}:6"] and "--max_len" in errors[f"{path}:6"]

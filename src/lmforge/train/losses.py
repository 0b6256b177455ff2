"""Training objectives: each loss function returns (sum, count), never a mean.

The loop divides the summed loss by the number of labelled tokens of the whole optimizer step —
over every micro-batch and every data-parallel rank — so a micro-batch with 3 labelled tokens
weighs 3/300 of one with 300, and gradient accumulation or more ranks do not change the result
(torchtitan's global valid-token normalization; the Hugging Face Trainer's 2024 fix). Labels
equal to ``IGNORE`` (-100) carry no loss: prompt tokens, padding, unmasked MLM positions.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lmforge.config import ConfigError
from lmforge.models.decoder import Decoder
from lmforge.models.lora import adapters_disabled

IGNORE = -100
LossFn = Callable[[nn.Module, Any, Tensor], tuple[Tensor, ...]]
"""(model, inputs, labels) -> (summed loss over labelled positions, their count), optionally
followed by a dict of other metrics summed over the same positions (the loop logs their mean)."""


def label_count(y: Tensor) -> Tensor:
    """Labelled positions of a batch's labels (tokens for LMs, rows for classification)."""
    return (y != IGNORE).sum()


def summed_cross_entropy(logits: Tensor, y: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """Cross-entropy summed over labelled positions; logits (..., V), labels (...)."""
    # fp32 logits: a bf16 log-softmax over a large vocabulary loses the small probabilities
    return nn.functional.cross_entropy(logits.flatten(0, -2).float(), y.flatten(),
                                       ignore_index=IGNORE, label_smoothing=label_smoothing,
                                       reduction="sum")


def _forward(model: nn.Module, x: Any) -> Tensor:
    """The model on a batch input: one tensor, or a tuple of positional arguments."""
    return model(*x) if isinstance(x, tuple) else model(x)


def token_loss(label_smoothing: float = 0.0) -> LossFn:
    """Next-token / masked-token / target-token cross-entropy for models returning (B, T, V)
    (decoder, masked LM, encoder-decoder: their batches already hold the shifted labels), and
    class cross-entropy for classifiers returning (B, num_labels) with labels (B,)."""

    def loss_fn(model: nn.Module, x: Any, y: Tensor) -> tuple[Tensor, Tensor]:
        return summed_cross_entropy(_forward(model, x), y, label_smoothing), label_count(y)

    return loss_fn


def packed_lm_loss(label_smoothing: float = 0.0) -> LossFn:
    """``causal_lm_loss`` over packed rows: x is (ids, segments), examples kept apart.

    The model gets the segments (``Decoder.forward``): block-diagonal attention and positions
    restarting per example, so a packed example's loss equals its loss alone.
    """
    return _decoder_loss(label_smoothing, packed=True)


def causal_lm_loss(label_smoothing: float = 0.0) -> LossFn:
    """Next-token cross-entropy of a decoder (x: ids (B, T), y: next ids, -100 = no loss).

    With a plain linear head the logits are never materialized whole: the head and the loss
    run in chunks of rows (``linear_cross_entropy``; 1.15-1.2x the llama-1m CPU step,
    benchmarks/). Other heads (LoRA, sharded) take the full-logits path.
    """
    return _decoder_loss(label_smoothing, packed=False)


def _decoder_loss(label_smoothing: float, packed: bool) -> LossFn:
    def loss_fn(model: nn.Module, x: Any, y: Tensor) -> tuple[Tensor, Tensor]:
        ids, kwargs = (x[0], {"segments": x[1]}) if packed else (x, {})
        head = _plain_head(model)
        if head is None:
            logits = model(ids, **kwargs)  # (B, T, V)
            return summed_cross_entropy(logits, y, label_smoothing), label_count(y)
        h = model(ids, hidden=True, **kwargs)  # (B, T, C)
        total = linear_cross_entropy(h.flatten(0, 1), head.weight, y.flatten(),
                                     label_smoothing=label_smoothing)
        return total, label_count(y)

    return loss_fn


def _plain_head(model: nn.Module) -> nn.Linear | None:
    """The decoder's output layer when it is an ordinary bias-free nn.Linear on plain tensors."""
    inner = getattr(model, "module", model)  # DDP
    head = getattr(inner, "lm_head", None) if isinstance(inner, Decoder) else None
    if type(head) is not nn.Linear or head.bias is not None:
        return None
    if isinstance(inner, Decoder) and inner.cfg.logit_softcap is not None:  # Gemma's cap
        return None
    from torch.distributed.tensor import DTensor

    return None if isinstance(head.weight, DTensor) else head


class _LinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of ``h @ w.T`` against ``y``, computed one chunk of rows at a time.

    The (N, V) logits never exist whole: each chunk's log-probabilities become its gradient in
    place (softmax minus the smoothed one-hot) and are multiplied out at once into dh and dw,
    so forward does the backward work and backward only scales. A chunk of 256 rows x 4096
    vocabulary (4 MiB) stays in cache.
    """

    @staticmethod
    def forward(ctx: Any, h: Tensor, w: Tensor, y: Tensor, chunk: int,
                label_smoothing: float) -> Tensor:
        grads = any(ctx.needs_input_grad[:2])
        valid_all = y != IGNORE  # (N,)
        dh = torch.empty_like(h) if grads else None  # (N, C)
        dw = torch.zeros_like(w) if grads else None  # (V, C)
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        eps, vocab = label_smoothing, w.shape[0]
        for s in range(0, h.shape[0], chunk):
            hc, valid = h[s:s + chunk], valid_all[s:s + chunk]  # (n, C), (n,)
            tgt = y[s:s + chunk].masked_fill(~valid, 0)[:, None]  # (n, 1)
            logp = torch.log_softmax((hc @ w.t()).float(), dim=-1)  # (n, V)
            nll = -logp.gather(1, tgt).squeeze(1)  # (n,)
            if eps:
                nll = (1 - eps) * nll - eps / vocab * logp.sum(-1)
            total += (nll * valid).sum()
            if dh is None or dw is None:
                continue
            grad = logp.exp_()  # softmax, in place of the log-probabilities
            grad.scatter_add_(1, tgt, torch.full_like(tgt, eps - 1, dtype=grad.dtype))
            if eps:
                grad.sub_(eps / vocab)
            grad.mul_(valid[:, None])  # ignored rows: 0
            grad = grad.to(hc.dtype)
            dh[s:s + chunk] = grad @ w.to(hc.dtype)
            dw.addmm_(grad.t().to(dw.dtype), hc.to(dw.dtype))
        ctx.save_for_backward(dh, dw)
        return total

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple:
        dh, dw = ctx.saved_tensors
        return dh * g, dw * g, None, None, None


def linear_cross_entropy(h: Tensor, weight: Tensor, y: Tensor, chunk: int = 256,
                         label_smoothing: float = 0.0) -> Tensor:
    """``cross_entropy(h @ weight.T, y, reduction="sum")`` over targets != -100, without ever
    holding the whole (N, V) logits; h (N, C), weight (V, C), y (N,)."""
    return _LinearCrossEntropy.apply(h, weight, y, chunk, label_smoothing)


def mean_loss(loss_fn: LossFn, model: nn.Module, x: Any, y: Tensor) -> Tensor:
    """The per-token mean of one batch, for tests and one-off evaluations."""
    total, count = loss_fn(model, x, y)[:2]
    return total / count.clamp(min=1)


# --------------------------------------------------------------------------- preference pairs

PreferenceKind = Literal["dpo", "ipo", "orpo", "simpo"]


@dataclass
class PreferenceConfig:
    """The strengths of the preference losses (each paper's recommended default)."""

    beta: float = 0.1
    """dpo: β, how tightly the policy stays near the reference (Rafailov et al. 2023); ipo: τ."""
    orpo_lambda: float = 0.1
    """orpo: λ, the weight of the odds-ratio term next to the chosen reply's NLL (Hong et al. 2024)."""
    simpo_beta: float = 2.0
    """simpo: β, the scale of the length-normalized reward (Meng et al. 2024)."""
    simpo_gamma: float = 1.0
    """simpo: γ, the target reward margin."""

    def __post_init__(self) -> None:
        if min(self.beta, self.orpo_lambda, self.simpo_beta) <= 0 or self.simpo_gamma < 0:
            raise ConfigError("pref: beta, orpo_lambda and simpo_beta must be > 0, "
                              "simpo_gamma >= 0")


def uses_reference(kind: PreferenceKind) -> bool:
    """DPO and IPO compare against a frozen reference model; ORPO and SimPO need none."""
    return kind in ("dpo", "ipo")


def sequence_logps(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """(summed log-probability of each row's labelled tokens, their number); logits (N, T, V),
    labels (N, T) already shifted, -100 = not part of the reply."""
    # fp32 for the same reason as summed_cross_entropy; ignored positions give 0
    nll = nn.functional.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(),
                                      ignore_index=IGNORE, reduction="none")
    return -nll.view(labels.shape).sum(-1), (labels != IGNORE).sum(-1)


def dpo_loss(pi_c: Tensor, pi_r: Tensor, ref_c: Tensor, ref_r: Tensor,
             beta: float) -> tuple[Tensor, Tensor, Tensor]:
    """DPO (Rafailov et al. 2023, eq. 7) per pair: -log σ(r_c - r_r), r = β(log π - log π_ref)
    of the whole reply. Returns (loss, chosen reward, rejected reward), each (B,)."""
    r_c, r_r = beta * (pi_c - ref_c), beta * (pi_r - ref_r)
    return -nn.functional.logsigmoid(r_c - r_r), r_c.detach(), r_r.detach()


def ipo_loss(pi_c: Tensor, pi_r: Tensor, ref_c: Tensor, ref_r: Tensor,
             tau: float) -> tuple[Tensor, Tensor, Tensor]:
    """IPO (Azar et al. 2023, eq. 17) per pair: (h - 1/(2τ))², h the difference of the replies'
    log-likelihood ratios to the reference (whole-reply sums, as the paper; TRL averages them
    per token). Rewards are the ratios themselves."""
    r_c, r_r = pi_c - ref_c, pi_r - ref_r
    return (r_c - r_r - 1 / (2 * tau)) ** 2, r_c.detach(), r_r.detach()


def orpo_loss(mean_c: Tensor, mean_r: Tensor, lam: float) -> tuple[Tensor, Tensor, Tensor]:
    """ORPO (Hong et al. 2024, eq. 6-7) per pair from mean token log-probs: the chosen reply's
    NLL + λ·(-log σ(log odds(c) - log odds(r))), odds(y) = P(y) / (1 - P(y)). Rewards are
    λ times the mean log-probs (as TRL logs them)."""
    # log(1 - P) = log1p(-exp(log P)); mean log-probs are < 0, so P < 1 and this is finite
    log_odds = (mean_c - mean_r) - (torch.log1p(-mean_c.exp()) - torch.log1p(-mean_r.exp()))
    loss = -mean_c - lam * nn.functional.logsigmoid(log_odds)
    return loss, lam * mean_c.detach(), lam * mean_r.detach()


def simpo_loss(mean_c: Tensor, mean_r: Tensor, beta: float,
               gamma: float) -> tuple[Tensor, Tensor, Tensor]:
    """SimPO (Meng et al. 2024, eq. 6) per pair: -log σ(β·mean log π(c) - β·mean log π(r) - γ);
    the rewards are β times the mean token log-probs (no reference model)."""
    r_c, r_r = beta * mean_c, beta * mean_r
    return -nn.functional.logsigmoid(r_c - r_r - gamma), r_c.detach(), r_r.detach()


@torch.no_grad()
def adapters_off_logps(model: nn.Module, ids: Tensor, labels: Tensor) -> Tensor:
    """The reference of a LoRA policy: the same model with its adapters switched off, in eval
    mode (no dropout) and without gradients — the frozen base, with no second copy in memory."""
    was_training = model.training
    model.eval()
    try:
        with adapters_disabled(model):
            return sequence_logps(_forward(model, ids), labels)[0]
    finally:
        model.train(was_training)


def preference_loss(kind: PreferenceKind, cfg: PreferenceConfig) -> LossFn:
    """The loss of preference pairs: x = (ids (2B, T): B chosen rows then their B rejected
    rows, labels (2B, T): reply tokens only, reference log-probs (2B,) or None), y one entry
    per pair. Returns (summed loss, pairs, summed metrics): reward margin and accuracy, the
    replies' summed log-probs, and how often the chosen reply has the higher mean token
    log-prob (the policy's own preference; DPO's reward accuracy is 0 before any step). Without precomputed reference log-probs, DPO/IPO take them
    from the model with its LoRA adapters off (``adapters_off_logps``)."""

    def loss_fn(model: nn.Module, x: Any, y: Tensor) -> tuple[Tensor, ...]:
        ids, labels, ref = x
        if uses_reference(kind) and ref is None:  # before the policy's forward, as TRL
            ref = adapters_off_logps(model, ids, labels)
        logps, counts = sequence_logps(_forward(model, ids), labels)  # (2B,), (2B,)
        pi_c, pi_r = logps.chunk(2)
        mean_c, mean_r = (logps / counts.clamp(min=1)).chunk(2)
        if kind == "orpo":
            loss, r_c, r_r = orpo_loss(mean_c, mean_r, cfg.orpo_lambda)
        elif kind == "simpo":
            loss, r_c, r_r = simpo_loss(mean_c, mean_r, cfg.simpo_beta, cfg.simpo_gamma)
        else:
            ref_c, ref_r = ref.chunk(2)
            loss, r_c, r_r = (dpo_loss if kind == "dpo" else ipo_loss)(
                pi_c, pi_r, ref_c, ref_r, cfg.beta)
        metrics = {"reward_margin": (r_c - r_r).sum(), "reward_accuracy": (r_c > r_r).sum(),
                   "logps_chosen": pi_c.detach().sum(), "logps_rejected": pi_r.detach().sum(),
                   # the model's own choice, reference-free: a higher mean token log-prob
                   "choice_accuracy": (mean_c > mean_r).sum()}
        return loss.sum(), label_count(y), metrics

    return loss_fn

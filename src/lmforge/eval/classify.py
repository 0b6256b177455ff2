"""Classification metrics: cross-entropy, accuracy and macro-F1 over fixed batches."""

from __future__ import annotations

import torch
from torch import Tensor, nn


def macro_f1(pred: Tensor, gold: Tensor, num_labels: int) -> float:
    """Mean of the per-class F1 over the classes that occur in ``gold`` or ``pred``."""
    conf = torch.zeros(num_labels, num_labels)  # (gold, predicted)
    conf.index_put_((gold, pred), torch.ones(len(gold)), accumulate=True)
    tp = conf.diag()
    denom = conf.sum(0) + conf.sum(1)  # 2*tp + fp + fn
    seen = denom > 0
    return float((2 * tp[seen] / denom[seen]).mean())


@torch.no_grad()
def class_metrics(model: nn.Module, batches: list, prefix: str = "val",
                  num_labels: int | None = None) -> dict[str, float]:
    """Mean cross-entropy, accuracy and macro-F1 over fixed batches (``num_labels``: default
    the model's, for a model wrapped by DDP say it)."""
    was = model.training
    model.eval()
    loss, preds, golds = 0.0, [], []
    for x, y in batches:
        logits = model(*x)  # (B, num_labels)
        loss += float(nn.functional.cross_entropy(logits, y, reduction="sum"))
        preds.append(logits.argmax(-1))
        golds.append(y)
    model.train(was)
    pred, gold = torch.cat(preds), torch.cat(golds)
    return {f"{prefix}_loss": loss / len(gold),
            f"{prefix}_accuracy": float((pred == gold).float().mean()),
            f"{prefix}_macro_f1": macro_f1(pred, gold, num_labels or model.cfg.num_labels)}

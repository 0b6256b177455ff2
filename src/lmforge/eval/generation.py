"""Scores of generated text against references: exact match, token Jaccard, ROUGE, BLEU.

ROUGE-1/2/L come from Google's `rouge-score` (F-measure, with its Porter stemmer) and BLEU
from `sacrebleu` (corpus BLEU, its default 13a tokenizer): the implementations papers report,
rather than our own re-implementation of them. Both are imported only when scoring.
"""

from __future__ import annotations

from lmforge.config import UserError


def normalize(text: str) -> str:
    """Lower-cased, whitespace-collapsed text: what exact match compares."""
    return " ".join(text.lower().split())


def exact_match(pred: str, ref: str) -> float:
    """1.0 when the normalized texts are equal, else 0.0."""
    return float(normalize(pred) == normalize(ref))


def token_jaccard(pred: str, ref: str) -> float:
    """|words in both| / |words in either| over lower-cased whitespace words (1.0 for two empties)."""
    a, b = set(normalize(pred).split()), set(normalize(ref).split())
    return len(a & b) / len(a | b) if a | b else 1.0


def _scorers():
    try:
        import sacrebleu
        from rouge_score import rouge_scorer
    except ImportError:
        raise UserError("generation metrics need rouge-score and sacrebleu: "
                        "pip install 'lmforge[eval]'") from None
    return rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True), sacrebleu


def generation_metrics(preds: list[str], refs: list[str]) -> dict[str, float]:
    """Mean exact match, token Jaccard, ROUGE-1/2/L F1 (0..1) and corpus BLEU (0..100)."""
    if len(preds) != len(refs) or not preds:
        raise ValueError("need as many predictions as references, at least one")
    rouge, sacrebleu = _scorers()
    n = len(preds)
    out = {"exact_match": sum(map(exact_match, preds, refs)) / n,
           "token_jaccard": sum(map(token_jaccard, preds, refs)) / n}
    for key in ("rouge1", "rouge2", "rougeL"):
        out[key] = 0.0
    for p, r in zip(preds, refs):
        scores = rouge.score(r, p)  # (target, prediction)
        for key in ("rouge1", "rouge2", "rougeL"):
            out[key] += scores[key].fmeasure / n
    out["bleu"] = float(sacrebleu.corpus_bleu(preds, [refs]).score)
    return out

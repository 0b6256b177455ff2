"""An lm-evaluation-harness (``lm_eval``) model over an lmforge decoder, and a task runner.

``HarnessLM`` subclasses the harness's ``TemplateLM``, so a (context, continuation) pair is
split into tokens by the harness's own ``_encode_pair`` (trailing context whitespace moves to
the continuation, the whole string is encoded once and the context's tokens cut off, as
``HFLM`` does) and an empty context is conditioned on the prefix token (BOS if the model has
one, else EOS). What is ours is the scoring: batched forward passes where only continuation
tokens count, rolling windows from the harness's ``get_rolling_token_windows``, and greedy
generation with stop strings through ``lmforge.infer.generate``.

This module imports ``lm_eval`` at the top: import it only when the harness is wanted
(`lmforge eval --harness` checks that it is installed first).
"""

from __future__ import annotations

import json
from collections.abc import Collection
from pathlib import Path
from typing import Any

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tokenizers import Tokenizer
from torch import Tensor

from lmforge.config import UserError
from lmforge.infer.chat import ChatTemplate
from lmforge.infer.generate import generate
from lmforge.models.decoder import Decoder

Pair = tuple[list[int], list[int]]  # (context ids, continuation ids)


class HarnessLM(TemplateLM):
    """A loaded lmforge decoder as an ``lm_eval`` model (loglikelihood, rolling, generate)."""

    def __init__(self, model: Decoder, tokenizer: Tokenizer, eos_id: int,
                 bos_id: int | None = None, batch_size: int = 8, max_gen_toks: int = 256,
                 template: ChatTemplate | None = None,
                 stop_ids: Collection[int] | None = None) -> None:
        super().__init__()
        if model.training:
            raise ValueError("call model.eval() before evaluating")
        self.model, self._tok, self._eos, self._bos = model, tokenizer, eos_id, bos_id
        self.batch_size, self.max_gen_toks, self._template = batch_size, max_gen_toks, template
        # generation ends at any of the run's end tokens (Llama 3 has several), as `generate` does
        self._stops = sorted(set(stop_ids or ()) | {eos_id})

    # ------------------------------------------------------------------ what the harness asks
    @property
    def eot_token_id(self) -> int:
        return self._eos

    @property
    def prefix_token_id(self) -> int:
        # HFLM's rule: BOS when the tokenizer has one, else EOS.
        return self._bos if self._bos is not None else self._eos

    @property
    def max_length(self) -> int:
        """Context length in tokens: the model's block size."""
        return self.model.cfg.block_size

    @property
    def device(self) -> torch.device:
        return self.model.tok_emb.weight.device

    @property
    def tokenizer_name(self) -> str:
        return "lmforge"

    def tok_encode(self, string: str, add_special_tokens: bool | None = None,
                   **kwargs: Any) -> list[int]:
        # As HFLM for a causal LM: no special tokens unless asked (a BOS comes from the
        # prefix token, and only for an empty context).
        return self._tok.encode(string, add_special_tokens=bool(add_special_tokens)).ids

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return self._template.source if self._template and chat_template else None

    def apply_chat_template(self, chat_history: list[dict[str, str]],
                            add_generation_prompt: bool = True) -> str:
        if self._template is None:
            raise UserError("--harness_chat_template: this run has no chat template")
        return self._template.render(chat_history, add_generation_prompt=add_generation_prompt)

    # ------------------------------------------------------------------ scoring
    def _loglikelihood_tokens(self, requests: list[tuple[Any, list[int], list[int]]],
                              disable_tqdm: bool = False, override_bs: int | None = None,
                              **kwargs: Any) -> list[tuple[float, bool]]:
        results = score_pairs(self.model, [(c, x) for _, c, x in requests],
                              override_bs or self.batch_size, self.prefix_token_id)
        for (key, _, _), answer in zip(requests, results):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, answer)
        return results

    def loglikelihood_rolling(self, requests: list[Any],
                              disable_tqdm: bool = False) -> list[float]:
        """Summed log-probability of each whole text, scored in the harness's rolling windows."""
        windows: list[Pair] = []
        counts: list[int] = []
        for (text,) in (r.args for r in requests):
            mine = [make_disjoint_window(w) for w in get_rolling_token_windows(
                self.tok_encode(text), self.prefix_token_id, self.max_length, context_len=1)]
            windows += mine
            counts.append(len(mine))
        scores = score_pairs(self.model, windows, self.batch_size, self.prefix_token_id)
        out, start = [], 0
        for request, n in zip(requests, counts):
            out.append(sum(s for s, _ in scores[start: start + n]))
            start += n
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, out[-1])
        return out

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Greedy continuations, cut before the first stop string (or EOS, or max_gen_toks)."""
        out = []
        for context, gen_kwargs in (r.args for r in requests):
            until = gen_kwargs.get("until") or [self._tok.decode([self._eos])]
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(gen_kwargs.get("max_gen_toks", self.max_gen_toks))
            prompt = self.tok_encode(context) or [self.prefix_token_id]
            text = greedy_until(self.model, self._tok, prompt, until, max_new, self._stops)
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
            out.append(text)
        return out


@torch.no_grad()
def score_pairs(model: Decoder, pairs: list[Pair], batch_size: int,
                pad_id: int) -> list[tuple[float, bool]]:
    """(sum of log p(continuation | context), whether every continuation token is the argmax).

    As the harness's HFLM: the input is (context + continuation) cut to the model's last
    block_size + 1 tokens, minus the last one; only the continuation's positions are scored.
    Rows are right-padded (a causal model's earlier positions never see the padding) and run
    longest first, so a batch holds rows of similar length.
    """
    block = model.cfg.block_size
    device = model.tok_emb.weight.device
    rows = []
    for ctx, cont in pairs:
        if not cont:
            raise ValueError("empty continuation")
        if len(cont) > block:
            raise UserError(f"a continuation of {len(cont)} tokens does not fit the model's "
                            f"context of {block} tokens")
        rows.append((ctx + cont)[-(block + 1):][:-1])
    order = sorted(range(len(pairs)), key=lambda i: -len(rows[i]))
    out: list[tuple[float, bool]] = [(0.0, False)] * len(pairs)
    for start in range(0, len(order), batch_size):
        idx = order[start: start + batch_size]
        x = torch.full((len(idx), len(rows[idx[0]])), pad_id, dtype=torch.long, device=device)
        for r, i in enumerate(idx):
            x[r, : len(rows[i])] = torch.tensor(rows[i])
        hidden = model(x, hidden=True)  # (B, T, C)
        for r, i in enumerate(idx):
            cont = torch.tensor(pairs[i][1], device=device)
            end = len(rows[i])
            logp = _log_probs(model, hidden[r, end - len(cont): end])  # (n, V)
            out[i] = (float(logp.gather(-1, cont[:, None]).sum()),
                      bool((logp.argmax(-1) == cont).all()))
    return out


def _log_probs(model: Decoder, hidden: Tensor) -> Tensor:
    # The head on the scored positions only: (T, V) logits of a whole 8k-token window would
    # be gigabytes for a 49k vocabulary. The tests check this equals the full forward.
    return model.head(hidden).float().log_softmax(-1)  # (n, V)


def greedy_until(model: Decoder, tokenizer: Tokenizer, prompt: list[int], until: list[str],
                 max_new: int, eos_id: int | Collection[int] | None) -> str:
    """Greedy text after ``prompt``, cut before the first of the ``until`` strings."""
    ids: list[int] = []
    text = ""
    for token in generate(model, prompt, max_new, temperature=0.0, eos_id=eos_id):
        ids.append(token)
        text = tokenizer.decode(ids)
        if any(s and s in text for s in until):
            break
    cut = min((text.index(s) for s in until if s and s in text), default=len(text))
    return text[:cut]


def run_tasks(lm: HarnessLM, tasks: list[str], include: str | None, limit: int | None,
              shots: int | None, seed: int, chat: bool = False) -> dict[str, Any]:
    """``lm_eval.simple_evaluate`` of ``tasks`` on ``lm``; the JSON-safe part of its results."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import handle_non_serializable

    if include is not None and not Path(include).is_dir():
        raise UserError(f"harness_include: {include}: no such folder of task YAML files")
    manager = _task_manager(TaskManager, tasks, include)
    unknown = [t for t in tasks if not manager.match_tasks([t])]
    if unknown:
        raise UserError(f"harness: unknown task {unknown[0]!r}; list them with `lm_eval ls tasks`"
                        " or add a folder of task YAMLs with --harness_include")
    res = simple_evaluate(model=lm, tasks=tasks, num_fewshot=shots, limit=limit,
                          task_manager=manager, log_samples=False, random_seed=seed,
                          numpy_random_seed=seed, torch_random_seed=seed,
                          fewshot_random_seed=seed, apply_chat_template=chat,
                          bootstrap_iters=1000)
    assert res is not None  # None only on ranks other than 0
    keep = {k: res[k] for k in ("results", "n-samples", "versions", "n-shot") if k in res}
    return json.loads(json.dumps(keep, default=handle_non_serializable))


def _task_manager(cls: Any, tasks: list[str], include: str | None) -> Any:
    """The harness's task index: of ``include`` alone when it defines every task asked for
    (indexing the thousands of built-in YAMLs takes most of a small run), else of both."""
    if include is not None:
        local = cls(include_path=include, include_defaults=False)
        if all(local.match_tasks([t]) for t in tasks):
            return local
    return cls(include_path=include)

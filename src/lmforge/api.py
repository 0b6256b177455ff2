"""The Python API: ``lmforge.load(run)`` gives an object that generates and chats.

    import lmforge
    lm = lmforge.load("runs/shakespeare")
    lm.generate("ROMEO.", max_new_tokens=50, temperature=0)
    lm.generate(["To be", "Once more"], seed=7)              # batched together
    for piece in lm.generate("ROMEO.", stream=True): print(piece, end="")
    lm.chat([{"role": "user", "content": "Hi"}])             # the run's chat template

    bert = lmforge.load("runs/bert")                          # an encoder (mlm) run
    bert.fill_mask("To be or not to [MASK]")                  # top guesses per [MASK]
    bert.embed(["first text", "second"])                      # (2, n_embd) mean-pooled states

    clf = lmforge.load("runs/minilm-vader")                   # a classifier (finetune --task classify)
    clf.classify(["A gem of a film.", "Dull and far too long."])
    # [{"label": "positive", "score": 0.97, "probs": {"negative": 0.03, "positive": 0.97}}, ...]

Generation goes through the continuous-batching engine (``infer/engine.py``) in the caller's
thread: a list of prompts runs as one batch, and one prompt gives the same greedy text as
``lmforge generate``. Not thread-safe: use one object per thread, or ``lmforge serve``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lmforge.config import UserError
from lmforge.data.classify import classify_batch, classify_ids
from lmforge.data.mlm import PAD_TOKEN, MlmVocab
from lmforge.infer.chat import ChatTemplate, load_chat_template, stop_token_ids
from lmforge.infer.engine import Engine, SamplingParams
from lmforge.infer.sampling import fit_prompt
from lmforge.models.decoder import Decoder
from lmforge.models.encoder import EncoderForClassification, EncoderForMaskedLM
from lmforge.run import LoadedModel, load_run


class LM:
    """A loaded decoder run: ``generate`` and ``chat``; see the module docstring."""

    def __init__(self, loaded: LoadedModel, template: str | None = None, max_batch: int = 4,
                 max_len: int | None = None):
        self.loaded = loaded
        self.model, self.tokenizer, self.run_dir = loaded.model, loaded.tokenizer, loaded.run_dir
        self.eos_id = loaded.eos_id
        self._template_name = template
        self._template: ChatTemplate | None = None
        self.engine = Engine(self.model, self.tokenizer.decode, eos_id=self.eos_id,
                             stop_ids=loaded.eos_ids,
                             max_batch=max_batch, max_queue=1 << 20, max_len=max_len)

    def __repr__(self) -> str:
        return f"LM({str(self.run_dir)!r}, step={self.loaded.step})"

    @property
    def template(self) -> ChatTemplate:
        """The chat template: the one named at load, else the run folder's (loaded once)."""
        if self._template is None:
            eos = self.tokenizer.id_to_token(self.eos_id) if self.eos_id is not None else ""
            self._template = load_chat_template(self.run_dir, self._template_name, eos or "")
        return self._template

    def generate(self, prompt: str | list[str], *, max_new_tokens: int = 200,
                 temperature: float = 0.8, top_k: int | None = 50, top_p: float | None = None,
                 min_p: float | None = None, repetition_penalty: float = 1.0,
                 stop: list[str] | None = None, seed: int | None = None,
                 stream: bool = False) -> str | list[str] | Iterator[str]:
        """Continue ``prompt`` (a list of prompts runs as one batch; returns a list).

        Defaults are ``lmforge generate``'s; temperature 0 is greedy. A prompt too long for the
        context loses tokens on the left, and max_new_tokens shrinks to what the context
        leaves. ``stream=True`` (one prompt) yields text pieces as they are made.
        """
        params = SamplingParams(max_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                                top_p=top_p, min_p=min_p, repetition_penalty=repetition_penalty,
                                seed=seed, stop=tuple(stop or ()))
        if isinstance(prompt, list):
            if stream:
                raise UserError("stream: give one prompt to stream, not a list")
            handles = [self._submit(self._encode(p), params) for p in prompt]
            return [h.result().text for h in handles]
        return self._run(self._encode(prompt), params, stream)

    def chat(self, messages: str | list[dict[str, Any]], *, max_new_tokens: int = 256,
             temperature: float = 0.7, top_k: int | None = 50, top_p: float | None = None,
             min_p: float | None = None, repetition_penalty: float = 1.0,
             seed: int | None = None, stream: bool = False) -> str | Iterator[str]:
        """The assistant's reply to ``messages`` (a string is one user message)."""
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        template = self.template
        ids = self._chat_ids(messages, max_new_tokens)
        params = SamplingParams(max_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                                top_p=top_p, min_p=min_p, repetition_penalty=repetition_penalty,
                                seed=seed, stop=template.stop,
                                stop_token_ids=stop_token_ids(template.stop,
                                                              self.tokenizer.token_to_id))
        return self._run(ids, params, stream)

    def fill_mask(self, text: str) -> Any:
        """Masked-token prediction: needs an encoder (BERT) run, which this is not."""
        raise UserError(f"{self.run_dir}: fill_mask needs an encoder (mlm) run; this is a decoder")

    def classify(self, text: str) -> Any:
        """Sequence classification: needs an encoder run with a classifier head."""
        raise UserError(f"{self.run_dir}: classify needs an encoder run with a classifier head; "
                        "this is a decoder")

    def embed(self, text: str) -> Any:
        """Sentence embeddings: needs an encoder run."""
        raise UserError(f"{self.run_dir}: embed needs an encoder (mlm) run; this is a decoder")

    # ----------------------------------------------------------------- helpers

    def _encode(self, text: str) -> list[int]:
        ids = self.tokenizer.encode(text).ids if text else []
        if not ids and self.eos_id is not None:
            ids = [self.eos_id]  # an empty prompt starts a fresh document, as in training
        return ids

    def _chat_ids(self, messages: list[dict[str, Any]], max_new_tokens: int) -> list[int]:
        """The rendered conversation's ids, without its oldest turns while it outgrows the
        context (system messages stay); a single turn too long is cut on the left later."""
        messages = list(messages)
        while True:
            text = self.template.render(messages, add_generation_prompt=True)
            ids = self.tokenizer.encode(text, add_special_tokens=False).ids or self._encode("")
            turns = [i for i, m in enumerate(messages) if m.get("role") != "system"]
            fitted = fit_prompt(ids, max_new_tokens, self.engine.context, truncate=True)[0]
            if len(fitted) == len(ids) or len(turns) <= 1:
                return ids
            del messages[turns[0]]

    def _submit(self, ids: list[int], params: SamplingParams) -> Any:
        """Fit prompt + max_tokens into the context (``fit_prompt``, truncating), then queue."""
        ids, max_tokens = fit_prompt(ids, params.max_tokens, self.engine.context, truncate=True)
        fitted = SamplingParams(**{**params.__dict__, "max_tokens": max_tokens})
        return self.engine.submit(ids, fitted)

    def _run(self, ids: list[int], params: SamplingParams, stream: bool) -> str | Iterator[str]:
        handle = self._submit(ids, params)
        if stream:
            return (event.text for event in handle if event.text)
        return handle.result().text


class EncoderLM:
    """A loaded encoder (BERT, masked LM) run: ``fill_mask`` and ``embed``."""

    def __init__(self, model: EncoderForMaskedLM, tokenizer: Any, run_dir: Path, step: int):
        self.model, self.tokenizer, self.run_dir, self.step = model, tokenizer, run_dir, step
        self.vocab = MlmVocab.from_tokenizer(tokenizer)

    def __repr__(self) -> str:
        return f"EncoderLM({str(self.run_dir)!r}, step={self.step})"

    def _ids(self, text: str) -> list[int]:
        """[CLS] text [SEP], as in training; UserError beyond the context."""
        ids = [self.vocab.cls_id, *self.tokenizer.encode(text, add_special_tokens=False).ids,
               self.vocab.sep_id]
        if len(ids) > self.model.cfg.block_size:
            raise UserError(f"text: {len(ids)} tokens with [CLS] and [SEP], but the model's "
                            f"context is {self.model.cfg.block_size}; shorten it")
        return ids

    @torch.inference_mode()
    def fill_mask(self, text: str, top_k: int = 5) -> list[list[tuple[str, float]]]:
        """For each [MASK] in ``text``, its ``top_k`` most likely tokens and probabilities."""
        ids = self._ids(text)
        where = [i for i, t in enumerate(ids) if t == self.vocab.mask_id]
        if not where:
            raise UserError("text: has no [MASK]; put [MASK] where a token is missing")
        device = self.model.cls.predictions.bias.device
        logits = self.model(torch.tensor([ids], device=device))[0]  # (T, V)
        out = []
        for i in where:
            probs, top = logits[i].float().softmax(-1).topk(top_k)
            out.append([(self.tokenizer.decode([t]), p) for t, p in
                        zip(top.tolist(), probs.tolist())])
        return out

    @torch.inference_mode()
    def embed(self, texts: str | list[str]) -> Tensor:
        """Mean of the last hidden states over each text's tokens: (n_embd,) or (B, n_embd)."""
        batch = [self._ids(t) for t in ([texts] if isinstance(texts, str) else texts)]
        width = max(len(ids) for ids in batch)
        device = self.model.cls.predictions.bias.device
        ids = torch.full((len(batch), width), self.vocab.pad_id, device=device)  # (B, T)
        mask = torch.zeros((len(batch), width), dtype=torch.long, device=device)
        for row, seq in enumerate(batch):
            ids[row, : len(seq)] = torch.tensor(seq)
            mask[row, : len(seq)] = 1
        hidden, _ = self.model.bert(ids, mask)  # (B, T, C)
        pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)  # (B, C)
        return pooled[0] if isinstance(texts, str) else pooled

    def classify(self, text: str) -> Any:
        """Sequence classification: needs a classifier head, which a masked-LM run has not."""
        raise UserError(f"{self.run_dir}: classify needs an encoder fine-tuned for "
                        "classification; this run is a masked-LM encoder (try fill_mask, embed)")

    def generate(self, *args: Any, **kw: Any) -> Any:
        """Text generation: needs a decoder run."""
        raise UserError(f"{self.run_dir}: an encoder does not generate text; load a decoder run")

    chat = generate


class Classifier:
    """A loaded sequence classifier (``finetune --task classify``, or an imported
    BertForSequenceClassification): ``classify``."""

    def __init__(self, model: EncoderForClassification, tokenizer: Any, run_dir: Path,
                 step: int, labels: list[str], max_len: int):
        self.model, self.tokenizer, self.run_dir, self.step = model, tokenizer, run_dir, step
        self.labels, self.max_len = labels, max_len
        self.pad_id = tokenizer.token_to_id(PAD_TOKEN) or 0

    def __repr__(self) -> str:
        return f"Classifier({str(self.run_dir)!r}, labels={self.labels}, step={self.step})"

    @torch.inference_mode()
    def classify(self, texts: str | list[str], batch_size: int = 32) -> Any:
        """Per text: ``{"label", "score", "probs"}``, the most likely label name, its
        probability and every label's (softmax over the logits). A string gives one dict, a list
        a list; a text longer than training's ``max_len`` tokens is cut as in training."""
        batch = [texts] if isinstance(texts, str) else list(texts)
        device = self.model.classifier.weight.device
        out: list[dict[str, Any]] = []
        for k in range(0, len(batch), batch_size):
            rows = [(torch.tensor(classify_ids(self.tokenizer, t, self.max_len)), 0)
                    for t in batch[k: k + batch_size]]
            (ids, mask), _ = classify_batch(rows, self.pad_id)
            probs = self.model(ids.to(device), mask.to(device)).float().softmax(-1)  # (B, L)
            for row in probs.tolist():
                best = max(range(len(row)), key=row.__getitem__)
                out.append({"label": self.labels[best], "score": row[best],
                            "probs": dict(zip(self.labels, row))})
        return out[0] if isinstance(texts, str) else out

    def generate(self, *args: Any, **kw: Any) -> Any:
        """Text generation: needs a decoder run."""
        raise UserError(f"{self.run_dir}: a classifier does not generate text; load a decoder run")

    chat = generate

    def fill_mask(self, *args: Any, **kw: Any) -> Any:
        """Masked-token prediction: needs a masked-LM encoder run."""
        raise UserError(f"{self.run_dir}: a classifier has no masked-LM head; load the encoder "
                        "run it was fine-tuned from")

    embed = fill_mask


def load(run: str | Path, *, template: str | None = None, device: str = "auto",
         dtype: str = "auto", max_batch: int = 4, max_len: int | None = None,
         quant: str | None = "none") -> LM | EncoderLM | Classifier:
    """Load a run folder (its latest checkpoint) or a checkpoint folder for inference.

    A decoder run gives an ``LM``; an encoder (``--objective mlm``) run an ``EncoderLM``; a
    classifier (``finetune --task classify``) a ``Classifier``.
    ``template`` names the chat template (``chatml`` or a .jinja file) when the run has none.
    ``max_batch`` prompts generate at once, each in ``max_len`` positions (default: the
    model's context; lower it for long-context models, the KV cache is preallocated).
    ``quant`` ("int8", "int4", "int8-dynamic") loads a decoder's weights quantized, as the
    CLI's ``--quant`` (see ``lmforge.infer.quant``).
    ``device`` (auto, cpu, cuda, cuda:N) and ``dtype`` (auto, fp32, bf16, fp16) are the CLI's
    ``--device``/``--dtype``: auto is cuda + bf16 when there is a GPU, else cpu + fp32.
    """
    loaded = load_run(run, device, dtype, "none" if quant is None else quant, rows=max_batch)
    spec, model, tok = loaded.spec, loaded.model, loaded.tokenizer
    if isinstance(model, EncoderForClassification):
        return Classifier(model, tok, spec.run_dir, spec.step, list(spec.labels),
                          spec.max_len or model.cfg.block_size)
    if isinstance(model, EncoderForMaskedLM):
        return EncoderLM(model, tok, spec.run_dir, spec.step)
    if not isinstance(model, Decoder):
        raise UserError(f"{spec.run_dir}: lmforge.load reads decoder (clm), encoder (mlm) and "
                        f"classifier runs; this one is {spec.kind}")
    lm = LoadedModel(model, tok, spec.run_dir, spec.checkpoint, spec.step, spec.eos_id,
                     spec.bos_id, list(spec.eos_ids))
    return LM(lm, template=template, max_batch=max_batch, max_len=max_len)

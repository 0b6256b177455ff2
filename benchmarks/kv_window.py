"""KV-cache memory of sliding-window models: lmforge's bounded cache vs transformers' cache and
vs keeping every position, with decode speed of the bounded cache vs the unbounded one.

A Mistral-style model (every layer slides) and a Gemma-3-style one (5 of 6 layers slide), both
with a window of 64 and random weights, prefill a 64-token prompt and greedy-decode 448 more
(8 windows in all). KV bytes are read from the cache tensors after the run: lmforge's
``generate`` cache (``Decoder.new_cache``), transformers' ``generate`` cache (its
``past_key_values``: a DynamicCache whose sliding layers keep window - 1 positions) on the same
weights (``lmforge.interop.hf.hf_state_dict``; the greedy tokens are checked identical), and
the layout lmforge had before (every layer keeps every position). Decode tokens/s of the bounded
and the unbounded cache: rounds alternate their order, the median round is reported.

    python benchmarks/kv_window.py               # ~1-2 minutes on 2 cores
    python benchmarks/kv_window.py --rounds 5
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch
from common import Section, load_average, median
from torch import nn

from lmforge.infer.generate import generate
from lmforge.interop.hf import export_architecture, hf_config, hf_state_dict
from lmforge.models.decoder import Decoder, DecoderConfig, KVCache

WINDOW, PROMPT, NEW = 64, 64, 448
BASE: dict[str, Any] = dict(vocab_size=512, block_size=1024, n_layer=6, n_head=4, n_embd=128,
                            sliding_window=WINDOW, init_std=0.2)
CONFIGS = {
    "Mistral-style (6 of 6 layers slide)": DecoderConfig(**BASE, n_kv_head=2),
    "Gemma-3-style (5 of 6 layers slide)": DecoderConfig(
        **BASE, n_kv_head=1, head_size=32, norm="rmsnorm1p", mlp="geglu", embed_scale=True,
        sandwich_norm=True, query_pre_attn_scalar=32.0, local_layers=[0, 1, 2, 3, 4],
        qk_norm=True, rope_local_theta=10000.0, rope_theta=1e6),
}


def hf_twin(model: Decoder) -> nn.Module:
    """transformers' model of the same architecture, with our weights."""
    import transformers

    arch = export_architecture(model.cfg)
    config = hf_config(model.cfg, bos_id=None, eos_id=None)
    hf_cfg = transformers.AutoConfig.for_model(config.pop("model_type"), **config)
    twin = getattr(transformers, arch)(hf_cfg)
    twin.load_state_dict(hf_state_dict(model, arch), strict=False)
    return twin.eval()


def cache_bytes(tensors: list[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def unbounded(model: Decoder, batch: int, max_len: int) -> KVCache:
    """The layout before bounded caches: every layer keeps every position."""
    cfg, w = model.cfg, model.tok_emb.weight
    return KVCache(cfg.n_layer, batch, cfg.kv_heads, max_len, cfg.head_dim, w.dtype, w.device)


def decode_rate(model: Decoder, prompt: list[int]) -> tuple[list[int], float]:
    """Greedy tokens and decode tokens/s (the prefill, up to the first token, left out)."""
    stream = generate(model, prompt, NEW, temperature=0.0)
    tokens = [next(stream)]
    t0 = time.perf_counter()
    tokens += list(stream)
    return tokens, (len(tokens) - 1) / (time.perf_counter() - t0)


def measure(name: str, cfg: DecoderConfig, rounds: int, section: Section) -> None:
    model = Decoder(cfg)
    model.init_weights(torch.Generator().manual_seed(0))
    model.eval()
    prompt = torch.randint(0, cfg.vocab_size, (PROMPT,),
                           generator=torch.Generator().manual_seed(1)).tolist()
    caches: list[KVCache] = []
    bounded_new = model.new_cache

    def keeping(batch: int, max_len: int | None = None, rollback: int = 0) -> KVCache:
        caches.append(bounded_new(batch, max_len, rollback))
        return caches[-1]

    model.new_cache = keeping  # type: ignore[method-assign]
    ours, _ = decode_rate(model, prompt)
    ours_bytes = cache_bytes([*caches[-1].k, *caches[-1].v])
    with torch.no_grad():
        out = hf_twin(model).generate(
            torch.tensor([prompt]), attention_mask=torch.ones(1, PROMPT, dtype=torch.long),
            do_sample=False, max_new_tokens=NEW, eos_token_id=None, pad_token_id=0,
            return_dict_in_generate=True)
    theirs = out.sequences[0, PROMPT:].tolist()
    hf_bytes = cache_bytes([t for layer in out.cache.layers
                            for t in (layer.keys, layer.values)])
    full = unbounded(model, 1, PROMPT + NEW - 1)
    full_bytes = cache_bytes([*full.k, *full.v])
    rates: dict[str, list[float]] = {"bounded": [], "unbounded": []}
    for r in range(rounds):
        for kind in (("bounded", "unbounded") if r % 2 == 0 else ("unbounded", "bounded")):
            model.new_cache = (keeping if kind == "bounded"  # type: ignore[method-assign]
                               else lambda b, m, rollback=0: unbounded(model, b, m))
            tokens, rate = decode_rate(model, prompt)
            assert tokens == ours, kind
            rates[kind].append(rate)
    b, u = median(rates["bounded"]), median(rates["unbounded"])
    section.rows.append([
        name, f"{ours_bytes / 2**10:,.0f}", f"{hf_bytes / 2**10:,.0f}",
        f"{ours_bytes / hf_bytes:.2f}", f"{full_bytes / 2**10:,.0f}",
        f"{ours_bytes / full_bytes:.2f}", f"{b:,.0f}", f"{u:,.0f}", f"{b / u:.2f}",
        "yes" if ours == theirs else "NO"])


def run(rounds: int = 3) -> Section:
    """The table for RESULTS.md."""
    torch.set_num_threads(1)  # see generation.py: two threads on a shared 2-core box thrash
    load = load_average()
    section = Section(
        "KV cache of sliding-window models: bounded vs transformers and vs every position, "
        "fp32 on CPU",
        f"Window {WINDOW}, a {PROMPT}-token prompt + {NEW} greedy tokens (8 windows), batch 1, "
        "6 layers of width 128, random weights; KV bytes read from the cache tensors after the "
        "run; decode tokens/s median of "
        f"{rounds} interleaved rounds, 1 torch thread (benchmarks/kv_window.py).",
        ["model", "lmforge KiB", "transformers KiB", "vs transformers", "every position KiB",
         "vs every position", "bounded tok/s", "unbounded tok/s", "bounded / unbounded",
         "same tokens as transformers"])
    for name, cfg in CONFIGS.items():
        measure(name, cfg, rounds, section)
    section.notes.append(f"load average (1/5/15 min): {load} before, {load_average()} after")
    return section


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    print(run(ap.parse_args().rounds).markdown())


if __name__ == "__main__":
    main()

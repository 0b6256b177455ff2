"""The batching engine with a draft model on a GPU (marked ``gpu``; skipped without CUDA): the
same code as on CPU with the device and dtype passed in. Run with ``pytest -m gpu tests/gpu``."""

from __future__ import annotations

import pytest
import torch

from lmforge.infer.engine import Engine
from lmforge.infer.generate import generate
from lmforge.infer.sampling import SamplingParams
from lmforge.models.decoder import Decoder, DecoderConfig

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def model_for(seed: int, dtype: torch.dtype, **kw: object) -> Decoder:
    base: dict[str, object] = dict(vocab_size=97, block_size=64, n_layer=2, n_head=4,
                                   n_kv_head=2, n_embd=64, init_std=0.3)
    base.update(kw)
    model = Decoder(DecoderConfig(**base))  # type: ignore[arg-type]
    model.init_weights(torch.Generator().manual_seed(seed))
    return model.to("cuda", dtype).eval()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_engine_with_a_draft_on_cuda_gives_the_targets_greedy_tokens(dtype: torch.dtype) -> None:
    target, draft = model_for(0, dtype), model_for(1, dtype, n_layer=1)
    engine = Engine(target, lambda ids: "", eos_id=None, max_batch=4, draft=draft,
                    draft_tokens=4)
    prompts = [[1, 2, 3], list(range(10, 30)), [5], [7, 7, 7, 7], [40, 41]]
    handles = [engine.submit(p, SamplingParams(max_tokens=20, temperature=0.0)) for p in prompts]
    results = [h.result().token_ids for h in handles]
    assert engine.cache.k[0].device.type == "cuda" and engine.draft_cache is not None
    assert engine.draft_cache.k[0].dtype == dtype
    for prompt, got in zip(prompts, results):
        assert len(got) == 20
        if dtype == torch.float32:  # bf16 rounding may flip a near tie between two forwards
            assert got == list(generate(target, prompt, 20, temperature=0.0))
    assert engine.spec.rounds > 0

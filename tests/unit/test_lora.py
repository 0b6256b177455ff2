"""LoRA: only adapters train, merged equals unmerged, adapters round-trip, bad targets refused."""

from __future__ import annotations

import pytest
import torch

from lmforge.config import OptimConfig, UserError
from lmforge.models.decoder import Decoder, DecoderConfig
from lmforge.models.lora import (
    LoRALinear,
    adapter_state_dict,
    apply_lora,
    load_adapter_state_dict,
    merge_lora,
)
from lmforge.models.quant import quantize_nf4
from lmforge.train.optim import build_optimizer

TARGETS = ["q_proj", "v_proj", "down_proj"]


def tiny(seed: int = 0) -> Decoder:
    torch.manual_seed(seed)
    model = Decoder(DecoderConfig(vocab_size=64, block_size=32, n_layer=2, n_head=4, n_embd=64))
    model.init_weights(torch.Generator().manual_seed(seed))
    return model


def _train_steps(model: Decoder, steps: int = 3) -> None:
    torch.set_num_threads(1)
    opt = build_optimizer(model, OptimConfig(lr=1e-2, warmup_steps=0))
    x = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), x.roll(-1).flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()


def test_only_adapter_params_train_and_base_stays_bit_identical() -> None:
    model = tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    names = apply_lora(model, rank=4, alpha=8, dropout=0.0, targets=TARGETS)
    assert len(names) == 6 and all(n.endswith(tuple(TARGETS)) for n in names)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)
    _train_steps(model)
    after = model.state_dict()
    for key, value in before.items():
        moved = key.replace("q_proj.", "q_proj.base.").replace("v_proj.", "v_proj.base.")
        moved = moved.replace("down_proj.", "down_proj.base.")
        assert torch.equal(after[moved], value), key
    assert any(v.abs().sum() > 0 for k, v in adapter_state_dict(model).items() if "lora_B" in k)


@pytest.mark.parametrize("nf4", [False, True])
def test_merged_equals_unmerged(nf4: bool) -> None:
    model = tiny()
    if nf4:
        quantize_nf4(model)
    apply_lora(model, rank=4, alpha=8, dropout=0.1, targets=TARGETS)
    _train_steps(model)  # B must be non-zero, or merging is trivially exact
    model.eval()
    x = torch.randint(0, 64, (2, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        unmerged = model(x)
        merged = merge_lora(model)(x)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert (merged - unmerged).abs().max() < 1e-5


def test_adapter_round_trip() -> None:
    a = tiny()
    apply_lora(a, 4, 8, 0.0, TARGETS)
    _train_steps(a)
    b = tiny()
    apply_lora(b, 4, 8, 0.0, TARGETS)
    load_adapter_state_dict(b, adapter_state_dict(a), "adapter.safetensors")
    x = torch.randint(0, 64, (1, 8))
    assert torch.equal(a.eval()(x), b.eval()(x))
    c = tiny()
    apply_lora(c, 2, 8, 0.0, TARGETS)
    with pytest.raises(UserError, match="shape"):
        load_adapter_state_dict(c, adapter_state_dict(a), "adapter.safetensors")


def test_bad_targets_are_user_errors() -> None:
    with pytest.raises(UserError, match="no module"):
        apply_lora(tiny(), 4, 8, 0.0, ["proj"])  # a suffix of names, but not a dotted one
    with pytest.raises(UserError, match="not a linear"):
        apply_lora(tiny(), 4, 8, 0.0, ["attn"])
    with pytest.raises(UserError, match="tied"):
        apply_lora(tiny(), 4, 8, 0.0, ["lm_head"])


def test_lora_on_a_bf16_base_trains_the_fp32_adapters() -> None:
    from lmforge.config import from_dict
    from lmforge.models.decoder import Decoder, DecoderConfig
    from lmforge.models.lora import LoraConfig
    from lmforge.train.finetune import adapt

    cfg = from_dict(DecoderConfig, {"vocab_size": 97, "block_size": 32, "n_layer": 2,
                                    "n_head": 4, "n_embd": 32})
    ref = Decoder(cfg)
    ref.init_weights(torch.Generator().manual_seed(0))
    model = Decoder(cfg)
    model.load_state_dict(ref.state_dict())
    adapt(model, "lora", LoraConfig(rank=4, alpha=8, dropout=0.0, targets=["q_proj", "v_proj"]),
          base_dtype="bf16")
    frozen = [m.weight for n, m in model.named_modules()
              if isinstance(m, torch.nn.Linear) and not m.weight.requires_grad and n != "lm_head"]
    assert frozen and all(w.dtype == torch.bfloat16 for w in frozen)
    assert model.tok_emb.weight.dtype == torch.float32  # the tied head stays with it
    trained = [p for p in model.parameters() if p.requires_grad]
    assert trained and all(p.dtype == torch.float32 for p in trained)
    x = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ref(x)
    got = model(x)  # B = 0 at the start: the bf16 base alone
    assert got.dtype == torch.float32
    assert (got - want).abs().max() < 0.05 * want.abs().max()
    got.logsumexp(-1).mean().backward()
    assert all(p.grad is not None for p in trained[1::2])  # lora_B of each adapted layer

"""The planner: counts equal the built models, and the memory arithmetic on hand-computed cases."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from lmforge.config import ConfigError
from lmforge.models.decoder import Decoder, DecoderConfig, count_params
from lmforge.models.registry import preset, preset_names
from lmforge.plan import (
    NF4_BYTES,
    InferSettings,
    TrainSettings,
    activation_bytes,
    compute_optimal,
    devices,
    flops_per_token,
    infer_memory,
    layer_activation_bytes,
    lora_params,
    make_plan,
    param_breakdown,
    param_counts,
    run_length,
    state_bytes,
    train_memory,
)

VARIANTS = {
    **{name: preset(name) for name in preset_names()},
    "mqa-untied": dataclasses.replace(preset("llama-6m"), n_kv_head=1, tie_embeddings=False),
    "gqa-ffn": dataclasses.replace(preset("llama-1m"), intermediate_size=200),
    "gpt2-untied-nobias": dataclasses.replace(preset("gpt2-124m"), n_layer=2, bias=False,
                                              tie_embeddings=False),
    "qwen2-style-qkv-bias-window": dataclasses.replace(preset("llama-1m"), qkv_bias=True,
                                                      sliding_window=64),
    "gelu-sinusoidal-layernorm": DecoderConfig(n_layer=3, n_embd=96, n_head=6, mlp="gelu",
                                               pos="sinusoidal", norm="layernorm", bias=True),
}


def _component(name: str) -> str:
    """Which param_breakdown entry a parameter of the built Decoder belongs to."""
    if name.startswith("tok_emb"):
        return "embedding"
    if name.startswith("pos_emb"):
        return "position"
    if name.startswith("lm_head"):
        return "head"
    if "norm" in name:
        return "norms"
    kind = "attention" if ".attn." in name else "mlp"
    return f"{kind}_{'biases' if name.endswith('bias') else 'weights'}"


@pytest.mark.parametrize("name", list(VARIANTS))
def test_counts_and_flops_equal_the_built_model(name: str) -> None:
    cfg = VARIANTS[name]
    with torch.device("meta"):  # free, even for gpt2-124m
        model = Decoder(cfg)
    built: dict[str, int] = {}
    for pname, p in model.named_parameters():  # a tied head is listed once, as tok_emb
        built[_component(pname)] = built.get(_component(pname), 0) + p.numel()
    parts = {k: v for k, v in param_breakdown(cfg).items() if v}
    assert parts == built
    counts = param_counts(cfg)
    assert counts["total"] == model.num_params() == count_params(cfg)
    assert counts["non_embedding"] == model.num_params(non_embedding=True)
    for seq_len in (1, 64, cfg.block_size):
        assert flops_per_token(cfg, seq_len) == model.flops_per_token(seq_len)


def test_known_counts_of_presets() -> None:
    assert param_counts(preset("llama-1m")) == {
        "total": 1_311_872, "embedding": 524_288, "non_embedding": 787_584,
        "flop_params": 1_311_872}
    gpt2 = param_counts(preset("gpt2-124m"))
    assert gpt2["total"] == 124_439_808
    assert gpt2["embedding"] == 50257 * 768 + 1024 * 768


# A model small enough to count by hand: h=8, a=2 heads of 4, one KV head (kv=4), f=16, L=2.
TINY = DecoderConfig(vocab_size=10, block_size=8, n_layer=2, n_head=2, n_kv_head=1, n_embd=8,
                     intermediate_size=16, mlp="gelu", pos="rope")


def test_tiny_params_by_hand() -> None:
    # attention 8*8*2 + 8*4*2 = 192, mlp 2*8*16 = 256, norms 2*8 per layer; + final norm 8.
    assert param_breakdown(TINY)["attention_weights"] == 2 * 192
    assert count_params(TINY) == 80 + 2 * (192 + 256 + 16) + 8 == 1016


def test_layer_activations_by_hand() -> None:
    s = TrainSettings(precision="fp32")
    # e=4, s*b=4: norm inputs 2h=16, MLP h+2f=40, attention h+q h+k,v 2kv+out 2h=40;
    # + fp32 logsumexp 4*a*s*b = 32 bytes.
    assert layer_activation_bytes(TINY, 1, 4, s) == 4 * 4 * (16 + 40 + 40) + 32 == 1568
    acts = activation_bytes(TINY, 1, 4, s)
    # head: final norm input + head input 2*e*s*b*h = 256; loss: 12 bytes * s*b*V = 480.
    assert acts == {"per_layer": 1568, "layers": 3136, "recompute": 0, "head": 256,
                    "loss": 480, "total": 3872}
    ac = activation_bytes(TINY, 1, 4, dataclasses.replace(s, activation_checkpointing=True))
    # Block inputs e*s*b*h each; then the larger of one recomputed block and the loss.
    assert ac["layers"] == 2 * (4 * 4 * 8) and ac["recompute"] == 1568
    assert ac["total"] == 256 + 256 + max(480, 1568)


def test_korthikanti_formula_is_the_math_path_with_dropout() -> None:
    # GPT layer of Korthikanti et al. 2022, 16-bit, dropout, no recomputation:
    # s*b*h*(34 + 5*a*s/h) bytes.
    cfg = DecoderConfig(n_layer=1, n_embd=64, n_head=4, mlp="gelu", norm="layernorm",
                        pos="learned", bias=True, dropout=0.1, block_size=32)
    s_, b, h, a = 32, 3, 64, 4
    got = layer_activation_bytes(cfg, b, s_, TrainSettings(precision="bf16", attention="math"))
    assert got == s_ * b * h * 34 + 5 * a * s_ * s_ * b


def test_state_bytes_by_precision_optimizer_and_method() -> None:
    n = count_params(TINY)  # 1016
    full = TrainSettings(precision="fp32")
    assert state_bytes(TINY, full) == {"weights": 4 * n, "gradients": 4 * n, "optimizer": 8 * n}
    mixed = TrainSettings(precision="bf16")  # ZeRO: 2 + 2 + 12
    assert state_bytes(TINY, mixed) == {"weights": 2 * n, "gradients": 2 * n,
                                        "optimizer": 12 * n}
    sgd = TrainSettings(precision="fp32", optimizer="sgd")
    assert state_bytes(TINY, sgd)["optimizer"] == 4 * n
    # LoRA r=2 on q, o (8+8) and k, v (8+4), all layers: 2 * 2 * (2*16 + 2*12) = 224.
    lora = TrainSettings(precision="bf16", method="lora", lora_rank=2, lora_targets="attention")
    assert lora_params(TINY, 2, "attention") == 224
    # the frozen base stays fp32 (as the code loads it), whatever the compute precision
    assert state_bytes(TINY, lora) == {"weights": 4 * n + 4 * 224, "gradients": 4 * 224,
                                       "optimizer": 8 * 224}
    qlora = dataclasses.replace(lora, method="qlora")
    # TINY's q, k, v, o, fc_in, fc_out: only those that fill whole blocks of 64 are NF4, each
    # 0.5 + 1/64 bytes per weight + one fp32 scale per 256 blocks + one fp32 offset.
    mats = [m for m in [64, 32, 32, 64, 128, 128] * 2 if m % 64 == 0]
    nf4 = sum(m // 2 + m // 64 + 4 + 4 for m in mats)
    assert state_bytes(TINY, qlora)["weights"] == (n - sum(mats)) * 4 + nf4 + 4 * 224
    assert abs(NF4_BYTES - 4.127 / 8) < 1e-4  # QLoRA paper: 0.127 bits of constants/param


def test_peak_is_the_larger_phase_and_accumulation_keeps_grads() -> None:
    s = TrainSettings(precision="fp32", batch_size=1, seq_len=4)
    m = train_memory(TINY, s)
    n = count_params(TINY)
    # Activations (3872) are smaller than the gradients (4n): the optimizer step is the peak.
    assert m["peak"] == 16 * n and m["sum"] == 16 * n + 3872
    big = train_memory(TINY, dataclasses.replace(s, batch_size=4))
    acts = activation_bytes(TINY, 4, 4, s)["total"]
    assert acts > 4 * n and big["peak"] == 4 * n + 8 * n + acts  # weights + AdamW + acts
    accum = train_memory(TINY, dataclasses.replace(s, grad_accum=4))
    assert accum["peak"] == accum["sum"]


def test_inference_memory_by_hand() -> None:
    rows = {r["weights_format"]: r for r in infer_memory(TINY, context=8, batch=3)}
    # KV: 2 * L * kv_heads * head_dim * context * batch * bytes = 2*2*1*4*8*3*2 = 768 in bf16.
    assert rows["bf16"]["kv_cache"] == 768 and rows["fp32"]["kv_cache"] == 1536
    assert rows["fp32"]["weights"] == 4 * 1016
    quantized = 2 * (192 + 256)
    assert rows["int8"]["weights"] == quantized + (1016 - quantized) * 2
    assert rows["int4"]["prefill_logits"] == 3 * 8 * 10 * 2
    with pytest.raises(ConfigError, match="block_size"):
        infer_memory(TINY, context=9, batch=1)


def test_compute_optimal_inverts_chinchilla() -> None:
    n, d = compute_optimal(6 * 1e6 * 20e6)
    assert n == pytest.approx(1e6) and d == pytest.approx(20e6)


def test_run_length_and_settings_errors() -> None:
    r = run_length(TINY, TrainSettings(batch_size=2, grad_accum=3, tokens=100))
    assert r == {"seq_len": 8, "tokens_per_step": 48, "steps": 3, "tokens": 144}
    with pytest.raises(ConfigError, match="seq_len"):
        run_length(TINY, TrainSettings(seq_len=16))
    with pytest.raises(ConfigError, match="both set"):
        TrainSettings(max_steps=10, tokens=100)
    with pytest.raises(ConfigError, match="lora_rank"):
        TrainSettings(lora_rank=0)


def test_make_plan_time_and_fit() -> None:
    cfg = preset("llama-1m")
    hw = list(devices(cpu_tflops=0.5, cpu_memory_gib=None).values())
    plan = make_plan(cfg, TrainSettings(max_steps=10), InferSettings(), hw, mfu=0.5)
    h100 = next(t for t in plan["time"] if t["device"] == "h100-sxm")
    assert h100["seconds"] == pytest.approx(plan["flops"]["hardware_total"] / (989e12 * 0.5))
    assert h100["fits"] is True and plan["time"][-1]["fits"] is None
    assert plan["flops"]["hardware_total"] == plan["flops"]["total"]  # full, no recompute
    lora = make_plan(cfg, TrainSettings(max_steps=10, method="lora", activation_checkpointing=True),
                     InferSettings(), hw, mfu=0.5)
    n, d = plan["params"]["flop_params"], plan["run"]["tokens"]
    attn = 4.0 * cfg.n_layer * 256 * cfg.n_embd
    assert lora["flops"]["hardware_total"] == pytest.approx(
        d * (6 * n + 4 * attn + 6 * lora_params(cfg, 8, "all_linear")))
    assert math.isclose(plan["chinchilla"]["n_opt"] ** 2 * 120, plan["flops"]["total_6nd"])
    with pytest.raises(ConfigError, match="mfu"):
        make_plan(cfg, TrainSettings(), InferSettings(), hw, mfu=1.5)


# --------------------------------------------------------------------------- the commands,
# in process (the smoke tests run the real executable once per command)


def test_plan_command_prints_every_table(capsys: pytest.CaptureFixture[str]) -> None:
    from lmforge.cli import run

    assert run(["plan", "--preset", "gpt2-124m", "--cpu_tflops", "0.2"]) == 0
    out = capsys.readouterr().out
    for needle in ("124,439,808", "6N + 12·L·T·d", "peak estimate", "qlora r=8", "KV cache",
                   "int4", "H100 SXM", "this CPU"):
        assert needle in out, needle


@pytest.mark.parametrize("args, needle", [
    (["--train.max_steps", "5", "--train.tokens", "10"], "train.max_steps"),
    (["--train.precision", "fp8"], "precision"),
    (["--train.seq_len", "4096"], "block_size"),
    (["--mfu", "0"], "mfu"),
    (["--preset", "bert-mini"], "decoder"),
])
def test_plan_command_errors(args: list[str], needle: str) -> None:
    from lmforge.cli import run

    with pytest.raises(ConfigError, match=needle):
        run(["plan", "--gpu", "a100", *args])  # a named GPU: no CPU measurement
    with pytest.raises(ConfigError, match="h100-sxm"):  # an unknown device names the valid ones
        run(["plan", "--gpu", "h100"])


def test_sweep_grid_and_base_parsing() -> None:
    from lmforge.recipes.sweep import base_args, parse_grid

    assert parse_grid("optim.lr=1e-3, 2e-3", "grid") == ("optim.lr", ["1e-3", "2e-3"])
    assert base_args("preset=llama-1m --train.max_steps 5 'samples=a b'") == [
        "--preset", "llama-1m", "--train.max_steps", "5", "--samples", "a b"]
    for bad, needle in (("optim.lr", "option=value1"), ("run=a,b", "set by the sweep"),
                        ("optim.lrr=1", "not a pretrain option"), ("optim.lr=1,1", "repeats")):
        with pytest.raises(ConfigError, match=needle):
            parse_grid(bad, "grid")
    with pytest.raises(ConfigError, match="--overwrite"):
        base_args("--overwrite")


def test_sweep_builds_every_point_before_running(tmp_path) -> None:
    from lmforge.config import UserError, build
    from lmforge.recipes import sweep

    cfg = build(sweep.Config, ["--name", "s", "--grid", "optim.lr=1e-3,2e-3",
                               "--grid2", "model.n_layer=1,2", "--runs_dir", str(tmp_path),
                               "--base", "preset=llama-1m train.max_steps=7"])
    points = sweep.build_points(cfg)
    assert [p.cfg.run for p in points] == ["s-0", "s-1", "s-2", "s-3"]
    assert points[3].settings == {"optim.lr": 2e-3, "model.n_layer": 2}
    assert points[3].cfg.model.n_embd == 128 and points[3].cfg.train.max_steps == 7
    assert all(p.cfg.samples == [] for p in points)
    bad = dataclasses.replace(cfg, grid2="model.n_head=3")  # 3 does not divide 128
    with pytest.raises(ConfigError, match="sweep point 0"):
        sweep.build_points(bad)
    (tmp_path / "s-1").mkdir()
    with pytest.raises(UserError, match="already has runs s-1"):
        sweep._check_fresh(cfg, points)


def test_per_device_states_under_fsdp_tp_and_ddp() -> None:
    n, block = count_params(TINY), 2 * (192 + 256)  # 1016 parameters, 896 in block matrices
    fp32 = TrainSettings(precision="fp32")
    # FSDP over 4: everything / 4, plus two gathered blocks (448 weights each) in fp32
    fsdp = state_bytes(TINY, dataclasses.replace(fp32, gpus=4))
    assert fsdp == {"weights": n + 2 * 448 * 4, "gradients": n, "optimizer": 2 * n}
    # DDP replicates: the single-device numbers
    assert state_bytes(TINY, dataclasses.replace(fp32, gpus=4, strategy="ddp")) == \
        state_bytes(TINY, fp32)
    # TP over 2 (no data parallelism): block matrices halved, the rest replicated
    tp = state_bytes(TINY, dataclasses.replace(fp32, gpus=2, tp=2))
    kept = n - block + block // 2  # 568
    assert tp == {"weights": 4 * kept, "gradients": 4 * kept, "optimizer": 8 * kept}


def test_tensor_parallel_activations_by_hand() -> None:
    # TINY, fp32, batch 1 x 4 (sb = 4), flash, no dropout, GELU MLP (h=8, f=16, a=2, kv=4):
    # replicated: 2 norm inputs + q/k/v input + MLP input = 4h; split: q h + k, v 2kv + SDPA
    # output and o_proj input 2h + 2f + logsumexp 4a (bytes per token).
    one = TrainSettings(precision="fp32")
    assert layer_activation_bytes(TINY, 1, 4, one) == 4 * 4 * (4 * 8 + 8 + 8 + 16 + 32) + 32
    two = dataclasses.replace(one, gpus=2, tp=2)
    assert layer_activation_bytes(TINY, 1, 4, two) == 4 * 4 * (4 * 8 + (8 + 8 + 16 + 32) / 2) + 16


def test_run_length_counts_data_parallel_ranks_only() -> None:
    s = TrainSettings(batch_size=2, grad_accum=3, max_steps=1, gpus=8, tp=2)
    assert run_length(TINY, s)["tokens_per_step"] == 2 * 3 * 8 * 4  # 4 data-parallel ranks
    with pytest.raises(ConfigError, match="train.tp: 3 must be >= 1 and divide train.gpus"):
        TrainSettings(gpus=8, tp=3)
    hw = list(devices(cpu_tflops=0.5, cpu_memory_gib=None).values())
    one = make_plan(TINY, TrainSettings(max_steps=10), InferSettings(), hw, mfu=0.5)
    eight = make_plan(TINY, TrainSettings(max_steps=10, gpus=8), InferSettings(), hw, mfu=0.5)
    # 8x the tokens on 8x the devices: the same wall time
    assert eight["run"]["tokens"] == 8 * one["run"]["tokens"]
    assert eight["time"][0]["seconds"] == pytest.approx(one["time"][0]["seconds"])


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("name", ["llama-1m", "mqa-untied", "gpt2-untied-nobias"])
def test_qlora_weights_are_what_the_built_model_stores(name: str, double_quant: bool) -> None:
    """The plan's QLoRA weight bytes = storage_bytes of the model finetune builds, on the meta
    device (full size) and built for real (one layer), less the RoPE tables the plan ignores."""
    from lmforge.models.lora import LoraConfig
    from lmforge.models.quant import is_nf4, nf4_summary
    from lmforge.models.quant import storage_bytes as stored
    from lmforge.train.finetune import adapt

    def storage_bytes(model: torch.nn.Module) -> int:
        quant = {id(b) for m in model.modules() if is_nf4(m) for b in m.buffers()}
        tables = sum(b.numel() * b.element_size() for b in model.buffers() if id(b) not in quant)
        return stored(model) - tables

    cfg = VARIANTS[name]
    attn = ["q_proj", "k_proj", "v_proj", "o_proj"]
    mlp = ["gate_proj", "up_proj", "down_proj"] if cfg.mlp == "swiglu" else ["fc_in", "fc_out"]
    lora = LoraConfig(rank=4, targets=attn + mlp, double_quant=double_quant)
    s = TrainSettings(method="qlora", lora_rank=4, double_quant=double_quant)
    with torch.device("meta"):
        model = Decoder(cfg)
    adapt(model, "qlora", lora)
    planned = train_memory(cfg, s)
    assert storage_bytes(model) == planned["weights"]
    assert nf4_summary(model)["bits_per_weight"] == pytest.approx(
        planned["nf4"]["bits_per_weight"])
    small = dataclasses.replace(cfg, n_layer=1, vocab_size=128, block_size=64)
    real = Decoder(small)
    real.init_weights(torch.Generator().manual_seed(0))
    adapt(real, "qlora", lora)
    assert storage_bytes(real) == train_memory(small, s)["weights"]
    assert next(real.parameters()).dtype == torch.float32  # the plan's "other_dtype"

"""Plan a run before training it: parameters, FLOPs, compute-optimal size, memory and time.

Pure arithmetic over a ``DecoderConfig`` and run settings; nothing is built or allocated, so a
70B plan costs as little as a 1M one. Every formula names its source where it is used. Sizes
are bytes (ints), compute is FLOPs (floats). Symbols: s sequence length, b micro-batch,
h = n_embd, a = n_head, L = n_layer, f = MLP width, V = vocab, kv = n_kv_head * head_dim,
e = bytes per activation element (4 in fp32, 2 in bf16/fp16).

The memory model is checked against measured peaks by ``benchmarks/plan_memory.py``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal

from lmforge.config import ConfigError, TrainConfig
from lmforge.models.decoder import DecoderConfig, count_params
from lmforge.models.quant import BLOCK as NF4_BLOCK
from lmforge.models.quant import nf4_matrix_bytes

Precision = Literal["fp32", "bf16", "fp16"]
Method = Literal["full", "lora", "qlora"]
METHODS: tuple[str, ...] = ("full", "lora", "qlora")

# Chinchilla (Hoffmann et al. 2022): compute-optimal training uses ~20 tokens per parameter.
CHINCHILLA_TOKENS_PER_PARAM = 20.0
# NF4 with double quantization (Dettmers et al. 2023, QLoRA §3): 4 bits per weight + 8-bit
# absmax per block of 64 + fp32 per 256 of those = 4 + 8/64 + 32/(64*256) = 4.127 bits (the
# limit of ``nf4_matrix_bytes``, which the plan uses matrix by matrix, as the code stores them).
NF4_BYTES = (4 + 8 / 64 + 32 / (64 * 256)) / 8
# LoRA and QLoRA keep the frozen base (QLoRA: all but the NF4 block matrices) in the dtype the
# checkpoint loads into, fp32; bf16/fp16 runs compute in 16 bits under autocast.
BASE_BYTES = 4
# Weight-only int4 (torchao / GPTQ style): groups of 128 with a bf16 scale and zero point.
INT4_BYTES = 0.5 + 4 / 128
# Weight-only int8 with one scale per output row: the scales are < 0.1% and not counted.
INT8_BYTES = 1.0
# lmforge's causal_lm_loss upcasts logits to fp32; at the start of backward the saved
# log-softmax output, its incoming gradient and its outgoing gradient coexist: 3 * 4 bytes.
LOSS_BYTES_PER_LOGIT = 12


# --------------------------------------------------------------------------- settings


@dataclass
class TrainSettings:
    """How the planned training run is shaped (names match `lmforge pretrain --train.*`)."""

    batch_size: int = TrainConfig.batch_size
    """Sequences per micro-batch."""
    seq_len: int | None = None
    """Training sequence length; null = the model's block_size."""
    grad_accum: int = TrainConfig.grad_accum
    """Micro-batches per optimizer step."""
    max_steps: int | None = None
    """Optimizer steps; null = from train.tokens, or pretrain's default when that is null too."""
    tokens: int | None = None
    """Total training tokens instead of max_steps (e.g. 2e9); rounded up to whole steps."""
    precision: Precision = "bf16"
    """fp32, or bf16/fp16 mixed precision (16-bit weights/activations, fp32 master weights)."""
    optimizer: Literal["adamw", "sgd"] = "adamw"
    """adamw (2 fp32 states per parameter) or sgd with momentum (1 state)."""
    method: Method = "full"
    """full fine-tuning/pretraining, lora (frozen base + adapters) or qlora (NF4 base + adapters)."""
    lora_rank: int = 8
    """Rank r of the LoRA/QLoRA adapters (each adapted d_in x d_out matrix adds r*(d_in+d_out))."""
    lora_targets: Literal["attention", "all_linear"] = "all_linear"
    """Which block matrices get adapters: q/k/v/o only, or every linear (QLoRA's recommendation)."""
    double_quant: bool = True
    """qlora: 8-bit block maxima (4.127 bits per weight) or fp32 ones (4.5), as --lora.double_quant."""
    activation_checkpointing: bool = False
    """Keep only each block's input and recompute the block in backward (one extra forward)."""
    attention: Literal["flash", "math"] = "flash"
    """flash = fused SDPA kernels (no s x s scores kept, also on CPU); math = scores stored."""
    gpus: int = 1
    """Devices training together (torchrun's world size). Memory is then per device, the global
    batch is batch_size x grad_accum x gpus/tp sequences, and time assumes the same MFU on all."""
    strategy: Literal["ddp", "fsdp"] = "fsdp"
    """With gpus > 1: ddp keeps every weight, gradient and optimizer state on each device
    (ZeRO-0); fsdp shards them over the data-parallel devices (ZeRO-3)."""
    tp: int = 1
    """Tensor-parallel degree (pretrain --dist.tp): each block's matrices and most of its
    activations are split over tp devices."""

    @property
    def dp(self) -> int:
        """Data-parallel degree: devices that each see their own micro-batches."""
        return self.gpus // self.tp

    def __post_init__(self) -> None:
        if self.gpus < 1 or self.tp < 1 or self.gpus % self.tp:
            raise ConfigError(f"train.tp: {self.tp} must be >= 1 and divide train.gpus "
                              f"({self.gpus})")
        for name in ("batch_size", "grad_accum", "lora_rank"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name}: must be >= 1, got {getattr(self, name)}")
        for name in ("seq_len", "max_steps", "tokens"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"train.{name}: must be >= 1 or null, got {value}")
        if self.max_steps is not None and self.tokens is not None:
            raise ConfigError("train.max_steps and train.tokens both set; give one of them")


@dataclass
class InferSettings:
    """The planned inference workload."""

    context: int | None = None
    """Tokens per sequence held in the KV cache (prompt + generated); null = block_size."""
    batch_size: int = 1
    """Sequences decoded together."""

    def __post_init__(self) -> None:
        if self.batch_size < 1 or (self.context is not None and self.context < 1):
            raise ConfigError("infer.batch_size and infer.context must be >= 1")


@dataclass(frozen=True)
class Device:
    """An accelerator's dense peak throughput and memory."""

    name: str
    label: str
    bf16_tflops: float
    fp32_tflops: float
    memory_gib: float | None

    def peak_tflops(self, precision: str) -> float:
        """Dense peak for matmuls in ``precision`` (fp32 = no TF32, PyTorch's default)."""
        return self.fp32_tflops if precision == "fp32" else self.bf16_tflops


def devices(cpu_tflops: float, cpu_memory_gib: float | None = None) -> dict[str, Device]:
    """Known devices by exact name. GPU numbers: NVIDIA datasheets, dense (no sparsity)."""
    return {
        "a100": Device("a100", "A100 SXM 80GB", 312.0, 19.5, 80.0),
        "h100-sxm": Device("h100-sxm", "H100 SXM", 989.0, 67.0, 80.0),
        "h200": Device("h200", "H200", 989.0, 67.0, 141.0),
        # GeForce: 165 is bf16/fp16 with fp32 accumulate (330 only with fp16 accumulate).
        "rtx-4090": Device("rtx-4090", "RTX 4090", 165.0, 82.6, 24.0),
        "l4": Device("l4", "L4", 121.0, 30.3, 24.0),
        # The CPU has no bf16 advantage we rely on: one measured/assumed number for both.
        "cpu": Device("cpu", "this CPU", cpu_tflops, cpu_tflops, cpu_memory_gib),
    }


# --------------------------------------------------------------------------- parameters


def param_breakdown(cfg: DecoderConfig) -> dict[str, int]:
    """Parameters by component (tied head counted once, under ``embedding``)."""
    c, f, v, kv = cfg.n_embd, cfg.ffn_dim, cfg.vocab_size, cfg.kv_heads * cfg.head_dim
    b = 1 if cfg.bias else 0
    qb = 1 if cfg.bias or cfg.qkv_bias else 0  # Qwen2 biases q, k and v only
    n_mats = 3 if cfg.mlp == "swiglu" else 2
    norm = c * (2 if cfg.norm == "layernorm" and cfg.bias else 1)
    return {
        "embedding": v * c,
        "position": cfg.block_size * c if cfg.pos == "learned" else 0,
        "attention_weights": cfg.n_layer * (2 * c * c + 2 * c * kv),
        "attention_biases": cfg.n_layer * (qb * (c + 2 * kv) + b * c),
        "mlp_weights": cfg.n_layer * n_mats * c * f,
        "mlp_biases": cfg.n_layer * b * ((n_mats - 1) * f + c),
        "norms": (2 * cfg.n_layer + 1) * norm,
        "head": 0 if cfg.tie_embeddings else v * c,
    }


def param_counts(cfg: DecoderConfig) -> dict[str, int]:
    """total, embedding (token + learned position tables), non_embedding, and flop_params.

    ``flop_params`` is N in 6N: non-embedding parameters plus the output head even when tied,
    because the head is a matmul on every token while lookups are free (as in
    ``Decoder.flops_per_token``). It is also the N of the Chinchilla rules below.
    """
    parts = param_breakdown(cfg)
    total = sum(parts.values())
    assert total == count_params(cfg), "param_breakdown disagrees with models.count_params"
    embedding = parts["embedding"] + parts["position"]
    non_embedding = total - embedding
    head = cfg.vocab_size * cfg.n_embd if cfg.tie_embeddings else 0
    return {"total": total, "embedding": embedding, "non_embedding": non_embedding,
            "flop_params": non_embedding + head}


def lora_params(cfg: DecoderConfig, rank: int, targets: str) -> int:
    """Adapter parameters: r*(d_in + d_out) per adapted matrix (Hu et al. 2021)."""
    c, f, kv = cfg.n_embd, cfg.ffn_dim, cfg.kv_heads * cfg.head_dim
    per_layer = 2 * (c + c) + 2 * (c + kv)  # q, o and k, v
    if targets == "all_linear":
        per_layer += (3 if cfg.mlp == "swiglu" else 2) * (c + f)
    return cfg.n_layer * rank * per_layer


def adapters_per_layer(cfg: DecoderConfig, targets: str) -> int:
    """Number of adapted matrices in one block."""
    return 4 + ((3 if cfg.mlp == "swiglu" else 2) if targets == "all_linear" else 0)


# --------------------------------------------------------------------------- compute


def flops_per_token(cfg: DecoderConfig, seq_len: int) -> float:
    """Model training FLOPs per token: 6*N + 12*L*T*d (PaLM, Chowdhery et al. 2022, app. B).

    6N: each weight costs 2 FLOPs forward and 4 backward; 12*L*T*d: attention scores and
    values over context T (d = n_head * head_dim = n_embd), forward and backward. The full
    T x T square is counted even though causal kernels skip half, as PaLM's MFU does.
    Equals ``Decoder.flops_per_token``.
    """
    n = param_counts(cfg)["flop_params"]
    return 6.0 * n + 12.0 * cfg.n_layer * seq_len * cfg.n_embd


def hardware_flops_per_token(cfg: DecoderConfig, seq_len: int, s: TrainSettings) -> float:
    """FLOPs the hardware actually runs per token, for the time estimate.

    LoRA/QLoRA skip the weight-gradient matmuls of frozen weights (2N of the 4N backward) and
    add 6 FLOPs per adapter parameter; activation checkpointing runs the forward twice
    (+2N + 4*L*T*d, Korthikanti et al. 2022 §5: full recomputation costs ~33% more).
    """
    n = param_counts(cfg)["flop_params"]
    attn_fwd = 4.0 * cfg.n_layer * seq_len * cfg.n_embd
    if s.method == "full":
        flops = 6.0 * n + 3 * attn_fwd
    else:
        flops = 4.0 * n + 3 * attn_fwd + 6.0 * lora_params(cfg, s.lora_rank, s.lora_targets)
    if s.activation_checkpointing:
        flops += 2.0 * n + attn_fwd
    return flops


def compute_optimal(budget_flops: float) -> tuple[float, float]:
    """(N_opt, D_opt) for a FLOPs budget: C = 6*N*D with D = 20*N gives N = sqrt(C / 120)."""
    n_opt = math.sqrt(budget_flops / (6.0 * CHINCHILLA_TOKENS_PER_PARAM))
    return n_opt, CHINCHILLA_TOKENS_PER_PARAM * n_opt


def run_length(cfg: DecoderConfig, s: TrainSettings) -> dict[str, int]:
    """seq_len, tokens per optimizer step, steps and total tokens of the run."""
    seq_len = s.seq_len or cfg.block_size
    if seq_len > cfg.block_size:
        raise ConfigError(f"train.seq_len {seq_len} exceeds model.block_size {cfg.block_size}")
    per_step = s.batch_size * s.grad_accum * seq_len * s.dp
    if s.max_steps is not None:
        steps = s.max_steps
    elif s.tokens is not None:
        steps = -(-s.tokens // per_step)
    else:
        steps = TrainConfig.max_steps
    return {"seq_len": seq_len, "tokens_per_step": per_step, "steps": steps,
            "tokens": steps * per_step}


# --------------------------------------------------------------------------- training memory


def act_bytes(precision: str) -> int:
    """Bytes per activation element."""
    return 4 if precision == "fp32" else 2


def state_bytes(cfg: DecoderConfig, s: TrainSettings) -> dict[str, int]:
    """Weights, gradients and optimizer states, in bytes, for ``s.method``.

    Full training follows ZeRO's accounting (Rajbhandari et al. 2020, §3.1): fp32 is 4 + 4 +
    8 (AdamW m, v) bytes per parameter; mixed precision is 2 (16-bit weights) + 2 (16-bit
    grads) + 12 (fp32 master copy, m, v). SGD keeps one momentum instead of m, v. LoRA keeps
    the frozen base in fp32 (``BASE_BYTES``: what lmforge loads; autocast computes in 16 bits)
    and trains fp32 adapters; QLoRA stores the block matrices in NF4 (``nf4_weights``) and
    keeps embeddings, output head, norms and biases fp32.
    """
    return _per_device(cfg, s, _model_state_bytes(cfg, s))


def block_matrices(cfg: DecoderConfig) -> list[int]:
    """Weights of each linear layer of the blocks (q, k, v, o, then the MLP's), all layers."""
    c, f = cfg.n_embd, cfg.ffn_dim
    q, kv = cfg.n_head * cfg.head_dim, cfg.kv_heads * cfg.head_dim
    n_mats = 3 if cfg.mlp == "swiglu" else 2
    return cfg.n_layer * [q * c, kv * c, kv * c, c * q, *[c * f] * n_mats]


def nf4_weights(cfg: DecoderConfig, double_quant: bool = True) -> dict[str, Any]:
    """What QLoRA's NF4 base stores, as ``models.quant.quantize_nf4`` builds it: every block
    matrix whose size is a multiple of 64, exactly ``nf4_matrix_bytes`` each; the rest fp32."""
    mats = [m for m in block_matrices(cfg) if m % NF4_BLOCK == 0]
    quantized, stored = sum(mats), sum(nf4_matrix_bytes(m, double_quant) for m in mats)
    rest = param_counts(cfg)["total"] - quantized
    return {"quantized_params": quantized, "nf4_bytes": stored,
            "bits_per_weight": 8 * stored / quantized if quantized else 0.0,
            "double_quant": double_quant, "other_params": rest, "other_dtype": "fp32",
            "weights": stored + rest * BASE_BYTES}


def _model_state_bytes(cfg: DecoderConfig, s: TrainSettings) -> dict[str, int]:
    n = param_counts(cfg)["total"]
    w16 = act_bytes(s.precision)
    moments = 8 if s.optimizer == "adamw" else 4
    if s.method == "full":
        mixed = s.precision != "fp32"
        return {"weights": n * w16, "gradients": n * w16,
                "optimizer": n * (moments + (4 if mixed else 0))}
    adapters = lora_params(cfg, s.lora_rank, s.lora_targets)
    base = n * BASE_BYTES
    if s.method == "qlora":
        base = nf4_weights(cfg, s.double_quant)["weights"]
    return {"weights": base + adapters * 4, "gradients": adapters * 4,
            "optimizer": adapters * moments}


def _per_device(cfg: DecoderConfig, s: TrainSettings, states: dict[str, int]) -> dict[str, int]:
    """One device's share of the model states under tensor parallelism and FSDP.

    TP splits the block matrices (the rest, embeddings / head / norms, is replicated); FSDP
    then divides everything by the data-parallel degree, but gathers one block's full
    parameters at a time and prefetches the next (2 blocks in the compute dtype, of the TP
    slice). Exact to within rounding for full training; LoRA states are scaled alike.
    """
    if s.gpus == 1:
        return states
    parts = param_breakdown(cfg)
    n = sum(parts.values())
    block = parts["attention_weights"] + parts["mlp_weights"]
    share = (n - block + block / s.tp) / n
    out = {k: v * share for k, v in states.items()}
    if s.strategy == "fsdp" and s.dp > 1:
        out = {k: v / s.dp for k, v in out.items()}
        out["weights"] += 2 * block / cfg.n_layer / s.tp * act_bytes(s.precision)
    return {k: round(v) for k, v in out.items()}


def layer_activation_bytes(cfg: DecoderConfig, batch: int, seq_len: int,
                           s: TrainSettings) -> int:
    """Bytes one block keeps for backward: Korthikanti et al. 2022, adapted to this decoder.

    Their GPT layer (16-bit, dropout, no recomputation) keeps s*b*h*(34 + 5*a*s/h) bytes:
    attention 11sbh + 5as²b, MLP 19sbh, two LayerNorms 4sbh. Term by term here, times e:
    two norm inputs 2h; q/k/v projection input h; q h, k and v 2kv (grouped KV heads keep
    fewer); the o_proj input h; the MLP: input h plus f per saved tensor (GELU: its input
    and output, 2f; SwiGLU: gate, silu(gate), up and their product, 4f). Flash-style SDPA
    keeps only an fp32 logsumexp (4 bytes * a*s*b) instead of the s*s scores, so the 5as²b
    term disappears, but it saves its own output: since SDPA returns (B, H, T, D) here, the
    (B, T, C) copy o_proj saves is a second h. The math path stores the softmax output
    (e * a*s²*b) and, with dropout, its 1-byte mask and dropped copy, and keeps k, v expanded
    to all heads; with bf16, dropout and a GELU MLP of 4h it is exactly Korthikanti's
    34sbh + 5as²b. Dropout adds 1-byte masks on both residual branches. LoRA adds each
    adapter's r-wide intermediate. Per-token norm statistics (< 1%) are not counted.
    """
    h, f, a, e = cfg.n_embd, cfg.ffn_dim, cfg.n_head, act_bytes(s.precision)
    kv = cfg.kv_heads * cfg.head_dim
    sb = seq_len * batch
    drop = cfg.dropout > 0
    t = s.tp  # TP splits everything between a column- and a row-parallel layer over t devices
    mlp = h + (4 if cfg.mlp == "swiglu" else 2) * f / t
    if s.attention == "flash":
        attn = e * sb * (h + (h + 2 * kv + 2 * h) / t) + 4 * a * sb / t
    else:
        scores = a * seq_len * sb * (e + (1 + e if drop else 0))
        attn = e * sb * (h + (3 * h + h) / t) + scores / t
    total = e * sb * (2 * h + mlp) + attn + (2 * sb * h if drop else 0)
    if s.method != "full":
        total += e * sb * s.lora_rank * adapters_per_layer(cfg, s.lora_targets)
    return round(total)


def activation_bytes(cfg: DecoderConfig, batch: int, seq_len: int,
                     s: TrainSettings) -> dict[str, int]:
    """Activations of one micro-batch at the end of forward: layers, head and loss.

    With activation checkpointing every block keeps only its input (e*s*b*h: Korthikanti's
    "full recomputation", 2sbhL in 16-bit), and backward recomputes one block at a time.
    The recomputed block and the loss's gradients are never alive together (the head's
    backward frees the latter before the last block is recomputed), so only the larger of
    the two counts; measured in benchmarks/plan_memory.py. Outside the blocks: the final norm
    input and the head input (2*e*s*b*h), the embedding dropout mask, and the loss
    (LOSS_BYTES_PER_LOGIT * s*b*V).
    """
    e, sb = act_bytes(s.precision), seq_len * batch
    one = layer_activation_bytes(cfg, batch, seq_len, s)
    if s.activation_checkpointing:
        layers, recompute = cfg.n_layer * e * sb * cfg.n_embd, one
    else:
        layers, recompute = cfg.n_layer * one, 0
    outside = 2 * e * sb * cfg.n_embd + (sb * cfg.n_embd if cfg.dropout > 0 else 0)
    loss = LOSS_BYTES_PER_LOGIT * sb * cfg.vocab_size
    return {"per_layer": one, "layers": layers, "recompute": recompute, "head": outside,
            "loss": loss, "total": layers + outside + max(loss, recompute)}


def train_memory(cfg: DecoderConfig, s: TrainSettings) -> dict[str, Any]:
    """Training memory in bytes: states, activations, the peak estimate and the plain sum.

    The peak is the larger of two moments: the end of forward (weights + optimizer states +
    all activations, + gradients when accumulating over micro-batches) and the optimizer step
    (weights + gradients + optimizer states). With zero_grad(set_to_none) the gradients of
    one step do not coexist with its activations. The sum of everything is an upper bound.
    Not counted: the CUDA context and allocator cache (~0.5-2 GiB on a GPU), kernels'
    workspaces, and the data loader.
    """
    seq_len = s.seq_len or cfg.block_size
    states = state_bytes(cfg, s)
    acts = activation_bytes(cfg, s.batch_size, seq_len, s)
    accum_grads = states["gradients"] if s.grad_accum > 1 else 0
    forward_end = states["weights"] + states["optimizer"] + acts["total"] + accum_grads
    step = states["weights"] + states["gradients"] + states["optimizer"]
    trainable = (param_counts(cfg)["total"] if s.method == "full"
                 else lora_params(cfg, s.lora_rank, s.lora_targets))
    out = {"method": s.method, "trainable_params": trainable, **states,
           "activations": acts["total"], "activation_parts": acts,
           "peak": max(forward_end, step), "sum": step + acts["total"]}
    if s.method == "qlora":
        out["nf4"] = nf4_weights(cfg, s.double_quant)
    return out


# --------------------------------------------------------------------------- inference memory


def infer_memory(cfg: DecoderConfig, context: int, batch: int) -> list[dict[str, Any]]:
    """Inference memory per weight format: weights, KV cache and prefill logits, in bytes.

    KV cache = 2 (k and v) * L * kv_heads * head_dim * context * batch * bytes, fp32 for fp32
    weights and bf16 otherwise. int8/int4 are weight-only formats of the block matrices; the
    embedding, head and norms stay bf16. lmforge's forward returns logits at every prompt
    position, so a prefill of the whole context holds batch * context * V of them.
    """
    if context > cfg.block_size:
        raise ConfigError(f"infer.context {context} exceeds model.block_size {cfg.block_size}")
    parts = param_breakdown(cfg)
    n = sum(parts.values())
    quantizable = parts["attention_weights"] + parts["mlp_weights"]
    rows = []
    for fmt, per_weight in (("fp32", 4.0), ("bf16", 2.0), ("int8", INT8_BYTES),
                            ("int4", INT4_BYTES)):
        e = 4 if fmt == "fp32" else 2
        weights = round(quantizable * per_weight + (n - quantizable) * e)
        kv = 2 * cfg.n_layer * cfg.kv_heads * cfg.head_dim * context * batch * e
        logits = batch * context * cfg.vocab_size * e
        rows.append({"weights_format": fmt, "weights": weights, "kv_cache": kv,
                     "prefill_logits": logits, "total": weights + kv + logits})
    return rows


# --------------------------------------------------------------------------- the plan


def train_seconds(hw_flops: float, device: Device, precision: str, mfu: float,
                  gpus: int = 1) -> float:
    """Wall time = hardware FLOPs / (devices * dense peak * utilization)."""
    return hw_flops / (gpus * device.peak_tflops(precision) * 1e12 * mfu)


def make_plan(cfg: DecoderConfig, train: TrainSettings, infer: InferSettings,
              hardware: list[Device], mfu: float, budget: float | None = None) -> dict[str, Any]:
    """Everything `lmforge plan` reports, as a JSON-able dict."""
    if not 0 < mfu <= 1:
        raise ConfigError(f"mfu: must be in (0, 1], got {mfu}")
    if budget is not None and budget <= 0:
        raise ConfigError(f"budget: must be > 0 FLOPs, got {budget}")
    params = param_counts(cfg)
    run = run_length(cfg, train)
    n, d = params["flop_params"], run["tokens"]
    per_token = flops_per_token(cfg, run["seq_len"])
    hw_total = hardware_flops_per_token(cfg, run["seq_len"], train) * d
    c6nd = 6.0 * n * d
    n_opt, d_opt = compute_optimal(budget or c6nd)
    memory = train_memory(cfg, train)
    by_method = {m: train_memory(cfg, dataclasses.replace(train, method=m)) for m in METHODS}
    context = infer.context or cfg.block_size
    times = [{"device": dev.name, "label": dev.label, "peak_tflops": dev.peak_tflops(
                  train.precision), "mfu": mfu,
              "seconds": train_seconds(hw_total, dev, train.precision, mfu, train.gpus),
              "memory_gib": dev.memory_gib,
              "fits": None if dev.memory_gib is None
              else memory["peak"] <= dev.memory_gib * 2**30} for dev in hardware]
    return {
        "model": dataclasses.asdict(cfg),
        "params": params,
        "run": run,
        "flops": {"per_token": per_token, "formula": "6*N + 12*L*T*d",
                  "hardware_per_token": hw_total / d, "total": per_token * d,
                  "total_6nd": c6nd, "hardware_total": hw_total},
        "chinchilla": {"tokens": CHINCHILLA_TOKENS_PER_PARAM * n, "tokens_per_param": d / n,
                       "budget_flops": budget or c6nd, "n_opt": n_opt, "d_opt": d_opt,
                       "rule": "D = 20*N; C = 6*N*D => N_opt = sqrt(C/120)"},
        "train_settings": dataclasses.asdict(train),
        "train_memory": memory,
        "train_memory_by_method": by_method,
        "infer": {"context": context, "batch_size": infer.batch_size,
                  "memory": infer_memory(cfg, context, infer.batch_size)},
        "time": times,
    }

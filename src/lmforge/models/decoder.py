"""A decoder-only transformer covering the GPT-2 and Llama families.

Reads top to bottom as the architecture: the config, then the components in forward order
(norm, position encodings, attention, MLP, block), and finally ``Decoder`` with
``init_weights()``, the one place initialization happens.

The family differences are config fields, not subclasses:
GPT-2 = LayerNorm + learned positions + GELU MLP + biases; Llama = RMSNorm + RoPE + SwiGLU,
no biases, optional grouped-query attention (``n_kv_head < n_head``). Small fields cover
the Llama relatives: Qwen2 (``qkv_bias``), Mistral (``sliding_window``), Qwen3 (``qk_norm``,
``head_size``) and Llama 3.1+ long context (``rope_scaling``). Gemma 2/3 are the same
computation with Gemma's fields set: ``norm`` rmsnorm1p, ``mlp`` geglu, ``embed_scale``,
``sandwich_norm``, ``query_pre_attn_scalar``, the soft caps, a window on ``local_layers`` only
and (Gemma 3) ``rope_local_theta`` for those layers.

Shapes: B batch, T new tokens, S attended positions (cache length + T), C = n_embd,
H = n_head, G = n_kv_head, D = head_dim, V = vocab_size.
The KV caches the attention writes into live in ``kv_cache.py``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmforge.config import ConfigError
from lmforge.models.kv_cache import KVCache, RowKVCache, causal_mask

# --------------------------------------------------------------------------- config


@dataclass
class RopeScaling:
    """How RoPE's frequencies are stretched beyond the context seen in pretraining.

    The ``rope_scaling`` of a Hugging Face config.json, for the types whose table is fixed
    (``dynamic`` NTK rescales with the running sequence length, so it has no fixed table).
    """

    type: Literal["none", "linear", "llama3", "yarn"] = "none"
    """none = plain RoPE; linear = positions / factor (Chen et al. 2023); llama3 = Llama 3.1's per-frequency blend; yarn = YaRN (Peng et al. 2023)."""
    factor: float = 1.0
    """Context extension factor (linear, llama3, yarn)."""
    original_block_size: int | None = None
    """Context length of pretraining (original_max_position_embeddings); null = block_size."""
    low_freq_factor: float = 1.0
    """llama3: wavelengths above original_block_size / low_freq_factor are divided by factor."""
    high_freq_factor: float = 4.0
    """llama3: wavelengths below original_block_size / high_freq_factor are kept."""
    beta_fast: float = 32.0
    """yarn: rotations at which the ramp from extrapolation to interpolation starts."""
    beta_slow: float = 1.0
    """yarn: rotations at which the ramp ends."""
    attention_factor: float | None = None
    """yarn: scale of cos and sin (softmax temperature); null = 0.1 * ln(factor) + 1."""
    truncate: bool = True
    """yarn: round the ramp's ends to whole dimensions (transformers' default)."""

    def __post_init__(self) -> None:
        _check_choice("rope_scaling.type", self.type, ("none", "linear", "llama3", "yarn"))
        if not self.factor > 0:
            raise ConfigError(f"rope_scaling.factor: must be positive, got {self.factor}")
        if self.original_block_size is not None and self.original_block_size <= 0:
            raise ConfigError("rope_scaling.original_block_size: must be positive or null, "
                              f"got {self.original_block_size}")
        if self.type == "llama3" and not 0 < self.low_freq_factor < self.high_freq_factor:
            raise ConfigError(
                "rope_scaling.low_freq_factor: llama3 needs 0 < low_freq_factor < "
                f"high_freq_factor, got {self.low_freq_factor} and {self.high_freq_factor}")


@dataclass
class DecoderConfig:
    """Shape and family of a decoder-only transformer. Defaults: a ~6M Llama-style model."""

    vocab_size: int = 4096
    """Number of token ids; a pretrain recipe replaces it with its tokenizer's vocabulary size."""
    block_size: int = 256
    """Maximum context length in tokens (positions 0 .. block_size-1)."""
    n_layer: int = 6
    """Number of transformer blocks."""
    n_head: int = 8
    """Number of query heads; must divide n_embd."""
    n_kv_head: int | None = None
    """Number of key/value heads: null = n_head (MHA), 1 = MQA, in between = GQA; must divide n_head."""
    n_embd: int = 256
    """Width of the residual stream."""
    intermediate_size: int | None = None
    """Hidden width of the MLP; null = 4*n_embd for gelu, for swiglu int(8/3*n_embd) rounded up to a multiple of 64 (Llama rounds to 256)."""
    norm: Literal["layernorm", "rmsnorm", "rmsnorm1p"] = "rmsnorm"
    """Normalization layer: layernorm (GPT-2), rmsnorm (Llama) or rmsnorm1p (Gemma: scale 1 + weight, in fp32)."""
    norm_eps: float = 1e-5
    """Epsilon added inside the norm for numerical safety."""
    pos: Literal["learned", "sinusoidal", "rope"] = "rope"
    """Position encoding: learned table (GPT-2), fixed sinusoids (Vaswani et al. 2017) or rotary (RoPE, Llama)."""
    rope_theta: float = 10000.0
    """RoPE base frequency (only used when pos = rope)."""
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    """Longer-context RoPE (only used when pos = rope): type none, linear, llama3 or yarn."""
    mlp: Literal["gelu", "swiglu", "geglu"] = "swiglu"
    """MLP type: gelu (GPT-2, two matrices), swiglu (Llama, three matrices) or geglu (Gemma: swiglu's matrices, tanh-GELU gate)."""
    bias: bool = False
    """Add biases to linear layers and LayerNorm (GPT-2 style)."""
    qkv_bias: bool = False
    """Add biases to the q/k/v projections only (Qwen2 style); implied by bias."""
    sliding_window: int | None = None
    """Each token attends to itself and the sliding_window-1 tokens before it (Mistral); null = all."""
    local_layers: list[int] | None = None
    """Layers (0-based) that use sliding_window, the others attend to all; null = every layer (Gemma 2: even layers, Gemma 3: 5 of every 6)."""
    head_size: int | None = None
    """Width of one attention head; null = n_embd / n_head. Qwen3 sets it (HF's head_dim)."""
    qk_norm: bool = False
    """Normalize each head's queries and keys (the configured norm over head_dim) before RoPE (Qwen3)."""
    embed_scale: bool = False
    """Multiply the token embeddings by sqrt(n_embd), rounded to the weights' dtype (Gemma)."""
    sandwich_norm: bool = False
    """Also normalize the attention and MLP outputs before each residual add (Gemma 2/3)."""
    query_pre_attn_scalar: float | None = None
    """Attention scores are scaled by query_pre_attn_scalar**-0.5 (Gemma); null = head_dim**-0.5."""
    attn_softcap: float | None = None
    """Cap attention scores s to cap*tanh(s/cap) before the mask (Gemma 2); null = no cap."""
    logit_softcap: float | None = None
    """Cap the output logits z to cap*tanh(z/cap) (Gemma 2, some Gemma 3); null = no cap."""
    rope_local_theta: float | None = None
    """RoPE base of the local_layers, which then get no rope_scaling (Gemma 3's rope_local_base_freq); null = the same RoPE in every layer."""
    tie_embeddings: bool = True
    """Share the token embedding matrix with the output head (saves vocab_size*n_embd parameters)."""
    dropout: float = 0.0
    """Dropout probability on embeddings, attention weights and residual branches; 0 for pretraining."""
    init_std: float = 0.02
    """Standard deviation of the normal init of weights (GPT-2 uses 0.02)."""

    def __post_init__(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}: must be a positive integer, got {getattr(self, name)}")
        for name in ("intermediate_size", "n_kv_head", "sliding_window", "head_size",
                     "query_pre_attn_scalar", "attn_softcap", "logit_softcap", "rope_local_theta"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(f"{name}: must be positive or null, got {value}")
        _check_choice("norm", self.norm, ("layernorm", "rmsnorm", "rmsnorm1p"))
        _check_choice("pos", self.pos, ("learned", "sinusoidal", "rope"))
        _check_choice("mlp", self.mlp, ("gelu", "swiglu", "geglu"))
        bad = [i for i in self.local_layers or [] if not 0 <= i < self.n_layer]
        if bad:
            raise ConfigError(f"local_layers: layer {bad[0]} does not exist; use indices "
                              f"0..{self.n_layer - 1}")
        if self.rope_local_theta is not None and self.pos != "rope":
            raise ConfigError(f"rope_local_theta: needs pos = rope, got pos = {self.pos}")
        if self.head_size is None and self.n_embd % self.n_head:
            raise ConfigError(
                f"n_head: {self.n_head} does not divide n_embd={self.n_embd}; "
                "choose n_head so that n_embd % n_head == 0"
            )
        if self.n_head % self.kv_heads:
            raise ConfigError(
                f"n_kv_head: {self.n_kv_head} does not divide n_head={self.n_head}; "
                "use a divisor of n_head (or null for n_head)"
            )
        if self.pos == "rope" and self.head_dim % 2:
            raise ConfigError(
                f"n_head: rope needs an even head_dim, but it is {self.head_dim}; "
                "change n_head, n_embd or head_size"
            )
        if self.pos != "rope" and self.rope_scaling.type != "none":
            raise ConfigError(f"rope_scaling.type: {self.rope_scaling.type} needs pos = rope, "
                              f"got pos = {self.pos}")
        if self.pos == "sinusoidal" and self.n_embd % 2:
            raise ConfigError(
                f"n_embd: sinusoidal positions need an even n_embd, got {self.n_embd}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout: must be in [0, 1), got {self.dropout}")
        for name in ("norm_eps", "rope_theta", "init_std"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}: must be positive, got {getattr(self, name)}")

    def window(self, layer: int) -> int | None:
        """The sliding window of layer ``layer`` (None: it attends to every earlier token)."""
        if self.local_layers is None or layer in self.local_layers:
            return self.sliding_window
        return None

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.n_embd // self.n_head if self.head_size is None else self.head_size

    @property
    def kv_heads(self) -> int:
        """Resolved number of key/value heads."""
        return self.n_head if self.n_kv_head is None else self.n_kv_head

    @property
    def ffn_dim(self) -> int:
        """Resolved MLP hidden width."""
        if self.intermediate_size is not None:
            return self.intermediate_size
        if self.mlp == "gelu":
            return 4 * self.n_embd
        # SwiGLU has 3 matrices instead of 2, so 2/3 of 4*C keeps the parameter count of a
        # GELU MLP (Shazeer 2020). Llama rounds up to a multiple of 256 (11008 for C=4096);
        # 64 keeps tiny models near 8/3*C (C=128: 384, not 512) and still aligns matmuls.
        # GeGLU (Gemma) has SwiGLU's three matrices: the same default.
        return _round_up(int(8 * self.n_embd / 3), 64)


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name}: must be one of {', '.join(choices)}; got {value!r}")


def _round_up(x: int, multiple: int) -> int:
    return (x + multiple - 1) // multiple * multiple


def count_params(cfg: DecoderConfig) -> int:
    """Parameter count of ``Decoder(cfg)`` predicted from the config alone (tied weights once)."""
    c, d, f, v = cfg.n_embd, cfg.head_dim, cfg.ffn_dim, cfg.vocab_size
    b = 1 if cfg.bias else 0
    qb = 1 if cfg.bias or cfg.qkv_bias else 0
    q, kv = cfg.n_head * d, cfg.kv_heads * d
    norm_params = 2 if cfg.norm == "layernorm" and cfg.bias else 1
    norm = c * norm_params
    attn = (c * q + qb * q) + (q * c + b * c) + (c * kv + qb * kv) * 2  # q, o, then k and v
    if cfg.qk_norm:
        attn += 2 * d * norm_params
    if cfg.mlp in ("swiglu", "geglu"):
        mlp = 2 * (c * f + b * f) + (f * c + b * c)
    else:
        mlp = (c * f + b * f) + (f * c + b * c)
    per_block = (4 if cfg.sandwich_norm else 2) * norm + attn + mlp
    emb = v * c + (cfg.block_size * c if cfg.pos == "learned" else 0)
    head = 0 if cfg.tie_embeddings else v * c
    return emb + cfg.n_layer * per_block + norm + head


# --------------------------------------------------------------------------- components


class RMSNorm1p(nn.Module):
    """Gemma's RMSNorm: x / rms(x) * (1 + weight), computed in fp32, then cast back.

    The weight is stored as the offset from 1 (zero-initialized), as Gemma checkpoints hold it;
    Gemma multiplies before the cast, where Llama casts first (transformers PR 29402).
    """

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: Tensor) -> Tensor:
        """x (..., dim) -> (..., dim) in x's dtype."""
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (h * (1.0 + self.weight.float())).type_as(x)


def make_norm(cfg: DecoderConfig, dim: int | None = None) -> nn.Module:
    """The configured normalization over the last dimension (``dim`` wide, default n_embd)."""
    dim = cfg.n_embd if dim is None else dim
    if cfg.norm == "rmsnorm1p":
        return RMSNorm1p(dim, eps=cfg.norm_eps)
    if cfg.norm == "rmsnorm":
        return nn.RMSNorm(dim, eps=cfg.norm_eps)
    return nn.LayerNorm(dim, eps=cfg.norm_eps, bias=cfg.bias)


def rope_tables(cfg: DecoderConfig, device: torch.device) -> tuple[Tensor, Tensor]:
    """cos and sin tables for RoPE (Su et al. 2021), each (block_size, head_dim), in fp32.

    fp32 because position * frequency reaches ~block_size radians: in bf16 the angle of a late
    position is off by several radians. Frequencies are duplicated as [f, f] to match the
    HF/Llama "rotate_half" layout, so HF Llama weights load with no permutation.
    """
    inv_freq, scale = rope_frequencies(cfg, device)
    t = torch.arange(cfg.block_size, device=device).float()
    freqs = torch.outer(t, inv_freq)  # (block_size, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (block_size, D)
    return emb.cos() * scale, emb.sin() * scale


def rope_frequencies(cfg: DecoderConfig, device: torch.device) -> tuple[Tensor, float]:
    """(inverse frequencies (D/2,), scale of cos/sin) under ``cfg.rope_scaling``.

    The formulas and their fp32 order of operations are those of transformers'
    ``modeling_rope_utils`` (``_compute_{default,linear_scaling,llama3,yarn}_parameters``), so
    imported models keep logit parity.
    """
    d, rs = cfg.head_dim, cfg.rope_scaling
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, device=device).float() / d))
    original = rs.original_block_size or cfg.block_size
    if rs.type == "linear":  # scaling positions by 1/factor = scaling frequencies by 1/factor
        return inv_freq / rs.factor, 1.0
    if rs.type == "llama3":
        return _llama3_frequencies(inv_freq, rs, original), 1.0
    if rs.type == "yarn":
        return _yarn_frequencies(cfg, device, original)
    return inv_freq, 1.0


def _llama3_frequencies(inv_freq: Tensor, rs: RopeScaling, original: int) -> Tensor:
    """Llama 3.1: keep short wavelengths, divide long ones by factor, blend in between."""
    low_freq_wavelen = original / rs.low_freq_factor
    high_freq_wavelen = original / rs.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / rs.factor, inv_freq)
    smooth = (original / wavelen - rs.low_freq_factor) / (rs.high_freq_factor - rs.low_freq_factor)
    smoothed = (1 - smooth) * scaled / rs.factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def _yarn_frequencies(cfg: DecoderConfig, device: torch.device,
                      original: int) -> tuple[Tensor, float]:
    """YaRN (Peng et al. 2023): interpolate the low frequencies, extrapolate the high ones,
    with a linear ramp between, and scale cos/sin by the attention factor (sec. 3.4)."""
    d, rs, base = cfg.head_dim, cfg.rope_scaling, cfg.rope_theta
    scale = rs.attention_factor
    if scale is None:
        scale = 0.1 * math.log(rs.factor) + 1.0 if rs.factor > 1 else 1.0

    def correction_dim(rotations: float) -> float:  # the dimension that turns `rotations` times
        return d * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(rs.beta_fast), correction_dim(rs.beta_slow)
    if rs.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, d - 1)
    if low == high:
        high += 0.001  # as transformers: avoid a division by zero
    ramp = ((torch.arange(d // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation = 1 - ramp.to(device)  # (D/2,), 1 = keep the original frequency
    pos_freqs = base ** (torch.arange(0, d, 2, device=device).float() / d)
    interpolated, extrapolated = 1.0 / (rs.factor * pos_freqs), 1.0 / pos_freqs
    return interpolated * (1 - extrapolation) + extrapolated * extrapolation, scale


def rotate_half(x: Tensor) -> Tensor:
    """(x1, x2) -> (-x2, x1) on the two halves of the last dimension."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate ``x`` (B, heads, T, D) by position tables ``cos``/``sin`` (T, D)."""
    # Cast the tables to x's dtype as HF Llama does, so low-precision parity is exact too.
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return x * cos + rotate_half(x) * sin


def sinusoid_table(cfg: DecoderConfig, device: torch.device) -> Tensor:
    """Fixed position encodings of Vaswani et al. 2017, (block_size, n_embd), in fp32.

    Interleaved: PE[p, 2i] = sin(p / 10000^(2i/C)), PE[p, 2i+1] = cos(same angle).
    """
    c = cfg.n_embd
    pos = torch.arange(cfg.block_size, device=device).float()[:, None]  # (block_size, 1)
    inv_freq = torch.exp(torch.arange(0, c, 2, device=device).float() * (-math.log(10000.0) / c))
    angles = pos * inv_freq  # (block_size, C/2)
    table = torch.stack((angles.sin(), angles.cos()), dim=-1)  # (block_size, C/2, 2)
    return table.flatten(1)  # (block_size, C)


Cache = KVCache | RowKVCache


def softcapped_attention(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None,
                         dropout_p: float = 0.0, is_causal: bool = False,
                         scale: float | None = None, enable_gqa: bool = False, *,
                         softcap: float) -> Tensor:
    """``F.scaled_dot_product_attention`` with Gemma 2's soft cap on the scores (B, H, T, S):
    softmax(cap * tanh(q k^T * scale / cap) + mask) v, softmax in fp32.

    SDPA's fused kernels take no cap, so this is written out in the order of transformers'
    eager Gemma 2 attention (the one it uses: it refuses SDPA for a cap), which keeps parity.
    """
    H, G, T, S = q.shape[1], k.shape[1], q.shape[2], k.shape[2]
    if enable_gqa and G != H:
        k, v = k.repeat_interleave(H // G, dim=1), v.repeat_interleave(H // G, dim=1)  # (B, H, S, D)
    scores = (q @ k.transpose(-2, -1)) * (q.shape[-1] ** -0.5 if scale is None else scale)
    scores = torch.tanh(scores / softcap) * softcap  # (B, H, T, S)
    if attn_mask is None and is_causal:  # top-left, as SDPA (the decoder passes it if S == T)
        attn_mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril()
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        scores = scores.masked_fill(~attn_mask, float("-inf"))
    elif attn_mask is not None:  # additive, as SDPA takes it
        scores = scores + attn_mask
    probs = scores.softmax(dim=-1, dtype=torch.float32).to(q.dtype)
    return F.dropout(probs, dropout_p) @ v  # (B, H, T, D)


class Attention(nn.Module):
    """Causal multi-head attention with separate q/k/v projections and grouped KV heads."""

    def __init__(self, cfg: DecoderConfig, layer: int) -> None:
        super().__init__()
        self.cfg, self.layer = cfg, layer
        c, q, kv = cfg.n_embd, cfg.n_head * cfg.head_dim, cfg.kv_heads * cfg.head_dim
        qkv_bias = cfg.bias or cfg.qkv_bias
        self.q_proj = nn.Linear(c, q, bias=qkv_bias)
        self.k_proj = nn.Linear(c, kv, bias=qkv_bias)
        self.v_proj = nn.Linear(c, kv, bias=qkv_bias)
        self.o_proj = nn.Linear(q, c, bias=cfg.bias)
        if cfg.qk_norm:  # Qwen3: one norm per head width, shared by all heads
            self.q_norm = make_norm(cfg, cfg.head_dim)
            self.k_norm = make_norm(cfg, cfg.head_dim)
        self.resid_drop = nn.Dropout(cfg.dropout)
        self.window = cfg.window(layer)  # Gemma: only some layers slide
        qpas = cfg.query_pre_attn_scalar
        self.scale = None if qpas is None else qpas**-0.5  # None: SDPA's 1/sqrt(head_dim)
        self.attend: Callable[..., Tensor] = F.scaled_dot_product_attention
        if cfg.attn_softcap is not None:
            self.attend = partial(softcapped_attention, softcap=cfg.attn_softcap)

    def forward(
        self, x: Tensor, rope: tuple[Tensor, Tensor] | None, cache: Cache | None,
        mask: Tensor | None = None, input_pos: Tensor | None = None,
    ) -> Tensor:
        """x (B, T, C) -> (B, T, C); ``rope`` holds the (T, D) or (B, 1, T, D) position tables.

        ``mask`` (B, 1, T, T), from ``segment_mask``, replaces the causal mask (packed rows);
        with a static ``KVCache`` it is the (T, S) mask of positions ``input_pos`` (T,).
        """
        B, T, _ = x.shape
        D = self.cfg.head_dim
        # Heads are counted from the projections, not the config: under tensor parallelism
        # (parallel.apply_tp) each rank holds n_head/tp query and kv_heads/tp key/value heads.
        q = self.q_proj(x).view(B, T, -1, D)  # (B, T, H, D)
        k = self.k_proj(x).view(B, T, -1, D)  # (B, T, G, D)
        if self.cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # (B, H, T, D), (B, G, T, D)
        v = self.v_proj(x).view(B, T, -1, D).transpose(1, 2)  # (B, G, T, D)
        H, G = q.shape[1], k.shape[1]
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if isinstance(cache, KVCache):
            assert input_pos is not None and mask is not None
            k, v = cache.update(self.layer, k, v, input_pos)  # (B, G, S, D), S fixed per layer
        elif cache is not None:
            mask = cache.attn_mask(T, self.window, x.device)
            k, v = cache.update(self.layer, k, v)  # (B, G, S, D), S = past + T
        elif mask is None:
            mask = causal_mask(T, 0, self.window, x.device)
        y = self.attend(
            q,
            k,
            v,
            attn_mask=mask,
            is_causal=mask is None and T > 1,  # no mask and T > 1 means a fresh prefill
            dropout_p=self.cfg.dropout if self.training else 0.0,
            # Instead of repeat_interleave-ing k, v to H heads. Measured on 2 CPU cores,
            # torch 2.13, B16 T256: identical output, SDPA fwd+bwd 12-20% faster, llama-1m
            # training step ~2% and 1-token decode ~8% faster. Needs torch>=2.5.
            enable_gqa=G != H,
            scale=self.scale,
        )  # (B, H, T, D)
        y = y.transpose(1, 2).reshape(B, T, H * D)  # (B, T, H*D), or H*D/tp per TP rank
        return self.resid_drop(self.o_proj(y))


def segment_positions(segments: Tensor) -> Tensor:
    """Position of each token within its segment, (B, T): 0 where a new segment starts.

    ``segments`` (B, T) labels each token with its example in a packed row (0, 0, 0, 1, 1, ...);
    a segment is a run of equal labels, so adjacent examples need different labels.
    """
    T = segments.shape[1]
    t = torch.arange(T, device=segments.device).expand_as(segments)  # (B, T)
    starts = torch.ones_like(segments, dtype=torch.bool)
    starts[:, 1:] = segments[:, 1:] != segments[:, :-1]
    return t - torch.where(starts, t, 0).cummax(dim=1).values  # (B, T)


def segment_mask(segments: Tensor, window: int | None) -> Tensor:
    """Bool (B, 1, T, T): causal, and only within a segment (block-diagonal), for packed rows.

    Every query sees at least itself, so no row of the mask is empty (SDPA would give NaN).
    """
    i = torch.arange(segments.shape[1], device=segments.device)
    mask = (i[None, :] <= i[:, None]) & (segments[:, :, None] == segments[:, None, :])  # (B, T, T)
    if window is not None:
        mask &= i[None, :] > i[:, None] - window
    return mask[:, None]  # (B, 1, T, T), broadcast over heads


class MLP(nn.Module):
    """Position-wise feed-forward: GELU (GPT-2), SwiGLU (Llama) or GeGLU (Gemma; Shazeer 2020)."""

    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.swiglu = cfg.mlp in ("swiglu", "geglu")  # the same three matrices
        self.geglu = cfg.mlp == "geglu"
        c, f = cfg.n_embd, cfg.ffn_dim
        if self.swiglu:
            self.gate_proj = nn.Linear(c, f, bias=cfg.bias)
            self.up_proj = nn.Linear(c, f, bias=cfg.bias)
            self.down_proj = nn.Linear(f, c, bias=cfg.bias)
        else:
            self.fc_in = nn.Linear(c, f, bias=cfg.bias)
            self.fc_out = nn.Linear(f, c, bias=cfg.bias)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor) -> Tensor:
        """x (B, T, C) -> (B, T, C)."""
        if self.geglu:  # Gemma: the tanh GELU ("gelu_pytorch_tanh") gates
            gate = F.gelu(self.gate_proj(x), approximate="tanh")
            return self.drop(self.down_proj(gate * self.up_proj(x)))
        if self.swiglu:
            return self.drop(self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x)))
        # tanh-approximate GELU, because it is what GPT-2 was trained with ("gelu_new" in HF);
        # the exact erf form would break logit parity with converted GPT-2 weights.
        return self.drop(self.fc_out(F.gelu(self.fc_in(x), approximate="tanh")))


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x)) (GPT-2, Llama).

    With ``sandwich_norm`` (Gemma 2/3) each branch's output is normalized too before the add.
    """

    def __init__(self, cfg: DecoderConfig, layer: int) -> None:
        super().__init__()
        self.sandwich = cfg.sandwich_norm
        self.attn_norm = make_norm(cfg)
        self.attn = Attention(cfg, layer)
        if self.sandwich:
            self.attn_post_norm = make_norm(cfg)
        self.mlp_norm = make_norm(cfg)
        self.mlp = MLP(cfg)
        if self.sandwich:
            self.mlp_post_norm = make_norm(cfg)

    def forward(
        self, x: Tensor, rope: tuple[Tensor, Tensor] | None, cache: Cache | None,
        mask: Tensor | None = None, input_pos: Tensor | None = None,
    ) -> Tensor:
        """x (B, T, C) -> (B, T, C)."""
        if self.sandwich:
            x = x + self.attn_post_norm(self.attn(self.attn_norm(x), rope, cache, mask, input_pos))
            return x + self.mlp_post_norm(self.mlp(self.mlp_norm(x)))
        x = x + self.attn(self.attn_norm(x), rope, cache, mask, input_pos)
        return x + self.mlp(self.mlp_norm(x))


# --------------------------------------------------------------------------- model


class Decoder(nn.Module):
    """Token ids (B, T) -> next-token logits (B, T, V).

    Build on the meta device for free, then materialize::

        with torch.device("meta"):
            model = Decoder(cfg)
        model.to_empty(device="cpu")
        model.init_weights(generator)

    Building directly on a real device also works and is already initialized.
    """

    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        if cfg.pos == "learned":
            self.pos_emb = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.emb_drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.norm_f = make_norm(cfg)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        # Position tables are derived, not learned: non-persistent (not in the state dict).
        self.register_buffer("rope_cos", None, persistent=False)
        self.register_buffer("rope_sin", None, persistent=False)
        self.register_buffer("pos_table", None, persistent=False)
        self.register_buffer("rope_local_cos", None, persistent=False)  # Gemma 3's local layers
        self.register_buffer("rope_local_sin", None, persistent=False)
        self.windows = tuple({cfg.window(i): None for i in range(cfg.n_layer)})  # distinct
        self.init_weights()

    def init_buffers(self) -> None:
        """(Re)compute the fp32 position tables on the device of the weights."""
        device = self.tok_emb.weight.device
        if self.cfg.pos == "rope":
            self.rope_cos, self.rope_sin = rope_tables(self.cfg, device)
            if self.cfg.rope_local_theta is not None:
                local = replace(self.cfg, rope_theta=self.cfg.rope_local_theta,
                                rope_scaling=RopeScaling())
                self.rope_local_cos, self.rope_local_sin = rope_tables(local, device)
        elif self.cfg.pos == "sinusoidal":
            self.pos_table = sinusoid_table(self.cfg, device)

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> Decoder:
        # Every .to()/.to_empty()/.half() goes through _apply. Fixing up after it means:
        # (1) to_empty() after a meta build leaves valid position tables, even if the caller
        # loads a state dict instead of calling init_weights; (2) model.to(bfloat16) keeps the
        # tables in fp32 instead of rounding the angles; (3) the tied head stays tied: a move
        # off the meta device makes a new Parameter per module, silently untying them.
        super()._apply(fn, recurse)
        if self.cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self.init_buffers()
        return self

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """Initialize every parameter and buffer; the same generator seed gives the same model.

        normal(0, init_std) for linears and embeddings, zero biases, unit norm weights.
        Residual output projections (o_proj, down_proj / fc_out) use init_std/sqrt(2*n_layer),
        GPT-2's scaling so the residual stream's variance does not grow with depth.
        """
        self.init_buffers()
        for name, module in self.named_modules():
            self.init_module(name, module, generator)

    @torch.no_grad()
    def init_module(self, name: str, module: nn.Module,
                    generator: torch.Generator | None = None) -> None:
        """Initialize the own parameters of the submodule called ``name`` (see ``init_weights``).

        One module at a time, so the training setup can initialize a sharded model module by
        module with the same generator stream (and the same values) as one process would.
        """
        std = self.cfg.init_std
        if isinstance(module, nn.Linear):
            if name == "lm_head" and self.cfg.tie_embeddings:
                return  # the same tensor as tok_emb.weight: initialize it once
            is_resid = name.endswith(("o_proj", "down_proj", "fc_out"))
            resid_std = std / math.sqrt(2 * self.cfg.n_layer)
            nn.init.normal_(module.weight, 0.0, resid_std if is_resid else std, generator)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, 0.0, std, generator)
        elif isinstance(module, RMSNorm1p):
            nn.init.zeros_(module.weight)  # stored as the offset from a unit scale
        elif isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
            nn.init.ones_(module.weight)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)

    def new_cache(self, batch: int, max_len: int | None = None, rollback: int = 0) -> KVCache:
        """An empty KV cache for ``batch`` sequences of up to ``max_len`` (default block_size),
        in the weights' dtype; sliding layers keep their window (+ ``rollback``, the positions
        a caller may cut back) only."""
        cfg, w = self.cfg, self.tok_emb.weight
        max_len = cfg.block_size if max_len is None else min(max_len, cfg.block_size)
        return KVCache(cfg.n_layer, batch, cfg.kv_heads, max_len, cfg.head_dim, w.dtype, w.device,
                       self.layer_windows(), rollback)

    def new_row_cache(self, batch: int, max_len: int | None = None,
                      reserve: int | None = None, rollback: int = 0) -> RowKVCache:
        """An empty ``RowKVCache``: ``batch`` independent rows of up to ``max_len`` positions,
        ``reserve`` of them allocated now (default all; it grows on demand, sliding layers up
        to their window + ``rollback``)."""
        cfg, w = self.cfg, self.tok_emb.weight
        max_len = cfg.block_size if max_len is None else min(max_len, cfg.block_size)
        return RowKVCache(cfg.n_layer, batch, cfg.kv_heads, max_len, cfg.head_dim, w.dtype,
                          w.device, reserve, self.layer_windows(), rollback)

    def layer_windows(self) -> list[int | None]:
        """The sliding window of each layer (None: full attention)."""
        return [self.cfg.window(i) for i in range(self.cfg.n_layer)]

    def forward(self, idx: Tensor, cache: Cache | None = None,
                segments: Tensor | None = None, hidden: bool = False,
                input_pos: Tensor | None = None, last: bool = False) -> Tensor:
        """Logits (B, T, V) in the parameter dtype for token ids ``idx`` (B, T).

        With a static ``KVCache`` and ``input_pos`` (T,), the tokens sit at those positions
        (gpt-fast's ``forward(idx, input_pos)``): fixed shapes, no Python state, so the decode
        step compiles and exports; the caller keeps count, nothing is checked. Without
        ``input_pos``, ``idx`` continues the cached sequence(s): positions start at each row's
        cache length, attention covers the cached and the new tokens, and the cache advances
        by T. ``last`` applies the norm and the head to the last position only, (B, 1, V): a
        prefill needs no more, and the head is the largest matmul of a small model. ``segments`` (B, T) packs several examples per row (no cache): each token attends
        only within its own example and positions restart at 0 per example, so each example
        gets the logits it would get alone (HF's packing with position ids). The loss is
        computed by the caller.
        ``hidden`` returns the final normed hidden states (B, T, C) instead of logits, for a
        loss that applies the head itself in chunks (``train.losses.linear_cross_entropy``);
        it goes through ``forward`` so DDP's hooks run.
        """
        B, T = idx.shape
        masks: dict[int | None, Tensor] = {}  # per sliding window (one unless Gemma)
        pos: slice | Tensor
        if isinstance(cache, KVCache):
            if input_pos is None:  # continue where the cache ends, and count the tokens
                self._check_length(B, T, cache)
                input_pos = cache.next_positions(T)
                cache.advance(T)
            elif cache.batch not in (B, -1):  # -1: a PastKVCache takes any batch
                raise ValueError(f"batch {B} does not match the KV cache batch {cache.batch}")
            pos = input_pos
            # SDPA turns a bool mask into an additive one in every layer (a `where` per call);
            # once per forward is enough: 1-token SDPA 62 -> 40 us (llama-6m, 1 CPU thread).
            dtype = self.tok_emb.weight.dtype
            masks = {w: torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill_(
                ~m, float("-inf"))  # (T, S): 0 where seen, -inf where not
                for w, m in ((w, cache.mask(input_pos, w)) for w in self.windows)}
        else:
            self._check_length(B, T, cache)
            # A slice of T positions shared by all rows, or (B, T) when rows differ (RowKVCache).
            pos = slice(0, T) if cache is None else cache.positions(T)
        if segments is not None:
            if cache is not None:
                raise ValueError("segments: packed rows are for training, not with a KV cache")
            pos = segment_positions(segments)  # (B, T)
            masks = {w: segment_mask(segments, w) for w in self.windows}  # (B, 1, T, T) each
        x = self.tok_emb(idx)  # (B, T, C)
        if self.cfg.embed_scale:  # sqrt(C) rounded to the dtype first, as Gemma does
            x = x * torch.tensor(self.cfg.n_embd**0.5).to(x.dtype)
        if self.cfg.pos == "learned":
            x = x + self.pos_emb.weight[pos]  # (T, C) or (B, T, C)
        elif self.cfg.pos == "sinusoidal":
            x = x + self.pos_table[pos].to(x.dtype)  # (T, C) or (B, T, C)
        rope = None
        if self.cfg.pos == "rope":
            rope = (self.rope_cos[pos], self.rope_sin[pos])  # (T, D) or (B, T, D)
            if isinstance(pos, Tensor) and pos.dim() == 2:
                rope = (rope[0][:, None], rope[1][:, None])  # (B, 1, T, D): one row per sequence
        local = rope
        if self.rope_local_cos is not None:  # Gemma 3: the sliding layers' own RoPE base
            local = (self.rope_local_cos[pos], self.rope_local_sin[pos])  # (T, D) or (B, T, D)
            if isinstance(pos, Tensor) and pos.dim() == 2:
                local = (local[0][:, None], local[1][:, None])  # (B, 1, T, D)
        x = self.emb_drop(x)
        for block in self.blocks:
            window = block.attn.window
            block_rope = rope if window is None else local
            x = block(x, block_rope, cache, masks.get(window), input_pos)
        if cache is not None and not isinstance(cache, KVCache):
            cache.advance(T)
        if last:
            x = x[:, -1:]  # (B, 1, C)
        x = self.norm_f(x)  # (B, T, C)
        return x if hidden else self.head(x)  # (B, T, V)

    def head(self, x: Tensor) -> Tensor:
        """Logits (..., V) of final normed hidden states (..., C): lm_head, then Gemma's cap."""
        logits = self.lm_head(x)
        cap = self.cfg.logit_softcap
        return logits if cap is None else torch.tanh(logits / cap) * cap

    def _check_length(self, B: int, T: int, cache: Cache | None) -> None:
        end = T if cache is None else cache.end(T)
        if end > self.cfg.block_size:
            raise ConfigError(
                f"block_size: the sequence needs {end} positions but the model's "
                f"block_size is {self.cfg.block_size}; shorten the input or raise block_size"
            )
        if cache is not None:
            if end > cache.max_len:
                raise ValueError(f"KV cache full: {end} positions > max_len {cache.max_len}")
            if cache.batch != B:
                raise ValueError(f"batch {B} does not match the KV cache batch {cache.batch}")

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameter count, tied weights once; ``non_embedding`` drops the token/position tables.

        An untied lm_head stays in the non-embedding count (it is a matmul on every token).
        """
        n = sum(p.numel() for p in self.parameters())  # parameters() yields a tied tensor once
        if non_embedding:
            n -= self.tok_emb.weight.numel()
            if self.cfg.pos == "learned":
                n -= self.pos_emb.weight.numel()
        return n

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs (forward + backward) per token at context ``seq_len``.

        PaLM's estimate (Chowdhery et al. 2022, app. B), as in nanoGPT: 6N + 12*L*H*Q*T,
        6N for the weight matmuls (2 forward, 4 backward) and 12*L*H*Q*T for attention scores
        and values. N counts the output head even when tied: it is a matmul on every token
        (a large share of small models' compute), whereas embedding lookups are not.
        """
        cfg = self.cfg
        n = self.num_params(non_embedding=True)
        if cfg.tie_embeddings:
            n += self.lm_head.weight.numel()
        return 6.0 * n + 12.0 * cfg.n_layer * cfg.n_head * cfg.head_dim * seq_len

"""An encoder-decoder transformer: the original Transformer of Vaswani et al. 2017.

Reads top to bottom as the architecture: the config, then the components in forward order
(sinusoidal positions, the decoder's KV cache, attention, feed-forward, encoder layer, decoder
layer, encoder and decoder stacks), and finally ``Seq2Seq`` with ``init_weights()``.

The paper's model: token embeddings scaled by sqrt(d_model) plus fixed sinusoidal positions;
an encoder of self-attention + ReLU feed-forward layers; a decoder of causal self-attention,
cross-attention over the encoder output and feed-forward; post-norm residuals
``LayerNorm(x + dropout(sublayer(x)))``; one embedding matrix shared by the source, the target
and the output projection (section 3.4). ``norm = "pre"`` switches to the pre-norm residual
``x + dropout(sublayer(LayerNorm(x)))`` with a final LayerNorm after each stack (Wang et al.
2019), which trains more easily when deep.

Position table layout: the paper's frequencies, 1 / 10000^(2i/d), with the sines in the first
half of the vector and the cosines in the second (tensor2tensor's and HF Marian's layout)
instead of interleaved; a fixed permutation of dimensions, so the same model family.

Hugging Face mapping (post-norm = ``MarianMTModel`` 1:1): prefix every key with ``model.``
except ``lm_head.weight``::

    shared.weight                        -> model.shared.weight (tie_embeddings: also
                                            model.{encoder,decoder}.embed_tokens, lm_head)
    encoder.layers.N.self_attn.{q,k,v,out}_proj.*, .self_attn_layer_norm.*, .fc1.*, .fc2.*,
    .final_layer_norm.*                  -> model.encoder.layers.N.<same>
    decoder.layers.N.{self_attn,encoder_attn}.{q,k,v,out}_proj.*, .self_attn_layer_norm.*,
    .encoder_attn_layer_norm.*, .fc1.*, .fc2.*, .final_layer_norm.* -> model.decoder.layers.N.<same>

Marian also stores ``model.{encoder,decoder}.embed_positions.weight`` (the same sine table,
which we recompute and do not save) and ``final_logits_bias`` (zeros here). Config:
d_model = n_embd, {encoder,decoder}_layers, {encoder,decoder}_attention_heads = n_head,
{encoder,decoder}_ffn_dim = ffn_dim, max_position_embeddings = block_size, scale_embedding = true,
activation_function = activation, share_encoder_decoder_embeddings = tie_word_embeddings =
tie_embeddings, decoder_start_token_id = [BOS], eos_token_id = <|endoftext|>, pad_token_id =
[PAD] (the ids the pretrain recipe adds to the tokenizer), dropout = attention_dropout =
dropout, activation_dropout = 0. Pre-norm adds ``encoder.layer_norm`` and
``decoder.layer_norm``: ``PegasusForConditionalGeneration`` 1:1 (the same sine table, stored in
its files; source and target embeddings always shared). Marian's and Pegasus' LayerNorm epsilon
is fixed at 1e-5 (= our default norm_eps). ``interop/marian.py`` implements both directions.

Shapes: B batch, S source tokens, T target tokens (new ones, with a cache), P attended target
positions (cache length + T), C = n_embd, H = n_head, D = head_dim, F = ffn_dim, V = vocab_size.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmforge.config import ConfigError
from lmforge.models.decoder import KVCache

# --------------------------------------------------------------------------- config


@dataclass
class Seq2SeqConfig:
    """Shape of an encoder-decoder transformer. Defaults: a ~6M post-norm model (vocab 4096)."""

    vocab_size: int = 4096
    """Number of token ids (one vocabulary for source and target); the recipe sets it from the tokenizer."""
    block_size: int = 256
    """Maximum source length and maximum target length in tokens (HF max_position_embeddings)."""
    n_encoder_layer: int = 3
    """Number of encoder layers."""
    n_decoder_layer: int = 3
    """Number of decoder layers."""
    n_head: int = 4
    """Number of attention heads (encoder, decoder and cross-attention); must divide n_embd."""
    n_embd: int = 256
    """Width of the model (d_model)."""
    intermediate_size: int | None = None
    """Hidden width of the feed-forward layers (d_ff); null = 4*n_embd (the paper's 2048 for 512)."""
    norm: Literal["post", "pre"] = "post"
    """Residual layout: post = LayerNorm(x + sublayer(x)) as in the paper; pre = x + sublayer(LayerNorm(x)) plus a final LayerNorm per stack."""
    activation: Literal["relu", "gelu", "silu"] = "relu"
    """Feed-forward activation: relu (the paper), gelu (BART) or silu (Marian's swish)."""
    tie_embeddings: bool = True
    """Share one embedding matrix between source, target and the output projection (paper, section 3.4)."""
    dropout: float = 0.1
    """Dropout on embeddings + positions, attention weights and residual branches (the paper's P_drop)."""
    norm_eps: float = 1e-5
    """Epsilon inside LayerNorm."""

    def __post_init__(self) -> None:
        for name in ("vocab_size", "block_size", "n_encoder_layer", "n_decoder_layer", "n_head",
                     "n_embd"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}: must be a positive integer, got {getattr(self, name)}")
        if self.intermediate_size is not None and self.intermediate_size <= 0:
            raise ConfigError(f"intermediate_size: must be positive or null, got {self.intermediate_size}")
        for name, value, choices in (("norm", self.norm, ("post", "pre")),
                                     ("activation", self.activation, ("relu", "gelu", "silu"))):
            if value not in choices:
                raise ConfigError(f"{name}: must be one of {', '.join(choices)}; got {value!r}")
        if self.n_embd % self.n_head:
            raise ConfigError(
                f"n_head: {self.n_head} does not divide n_embd={self.n_embd}; "
                "choose n_head so that n_embd % n_head == 0"
            )
        if self.n_embd % 2:
            raise ConfigError(f"n_embd: sinusoidal positions need an even n_embd, got {self.n_embd}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout: must be in [0, 1), got {self.dropout}")
        if self.norm_eps <= 0:
            raise ConfigError(f"norm_eps: must be positive, got {self.norm_eps}")

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.n_embd // self.n_head

    @property
    def ffn_dim(self) -> int:
        """Resolved feed-forward hidden width."""
        return 4 * self.n_embd if self.intermediate_size is None else self.intermediate_size


def count_params(cfg: Seq2SeqConfig) -> int:
    """Parameter count of ``Seq2Seq(cfg)`` predicted from the config alone (tied weights once)."""
    c, f, v = cfg.n_embd, cfg.ffn_dim, cfg.vocab_size
    attn = 4 * (c * c + c)
    ffn = (c * f + f) + (f * c + c)
    norm = 2 * c
    encoder_layer = attn + ffn + 2 * norm
    decoder_layer = 2 * attn + ffn + 3 * norm
    emb = v * c if cfg.tie_embeddings else 3 * v * c  # source, target, output head
    final_norms = 2 * norm if cfg.norm == "pre" else 0
    return (emb + cfg.n_encoder_layer * encoder_layer + cfg.n_decoder_layer * decoder_layer
            + final_norms)


# --------------------------------------------------------------------------- components


def sinusoid_table(block_size: int, n_embd: int, device: torch.device | None = None) -> Tensor:
    """Fixed positions (block_size, C) in fp32: [sin(p / 10000^(2i/C)) | cos(same)], i < C/2."""
    pos = torch.arange(block_size, device=device).float()[:, None]  # (block_size, 1)
    i = torch.arange(0, n_embd, 2, device=device).float()  # 2i, (C/2,)
    angles = pos * torch.exp(i * (-math.log(10000.0) / n_embd))  # (block_size, C/2)
    return torch.cat((angles.sin(), angles.cos()), dim=-1)  # (block_size, C)


class Seq2SeqCache(KVCache):
    """What incremental decoding keeps per decoder layer.

    Self-attention keys/values are the decoder's static ``KVCache`` ((B, H, max_len, D) a layer),
    written at the positions after ``length`` and attended under its mask. Cross-attention keys/values depend
    only on the encoder output, so each layer computes them once, on its first call, and
    ``cross[layer]`` keeps them.
    """

    def __init__(self, n_layer: int, batch: int, n_head: int, max_len: int, head_dim: int,
                 dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> None:
        super().__init__(n_layer, batch, n_head, max_len, head_dim, dtype, device)
        self.cross: list[tuple[Tensor, Tensor] | None] = [None] * n_layer

    def reset(self) -> None:
        """Forget every position and the cross-attention keys/values of the last source."""
        super().reset()
        self.cross = [None] * len(self.cross)


AttnKind = Literal["encoder", "causal", "cross"]


class Attention(nn.Module):
    """Multi-head attention: encoder self-attention, causal decoder self-attention or cross."""

    def __init__(self, cfg: Seq2SeqConfig, layer: int, kind: AttnKind) -> None:
        super().__init__()
        self.cfg, self.layer, self.kind = cfg, layer, kind
        c = cfg.n_embd
        self.q_proj = nn.Linear(c, c)
        self.k_proj = nn.Linear(c, c)
        self.v_proj = nn.Linear(c, c)
        self.out_proj = nn.Linear(c, c)

    def _heads(self, x: Tensor) -> Tensor:
        B, L, _ = x.shape
        return x.view(B, L, self.cfg.n_head, self.cfg.head_dim).transpose(1, 2)  # (B, H, L, D)

    def forward(self, x: Tensor, memory: Tensor | None, src_mask: Tensor | None,
                cache: Seq2SeqCache | None) -> Tensor:
        """x (B, T, C) -> (B, T, C); ``memory`` (B, S, C) is the encoder output (cross only).

        ``src_mask`` (B, 1, 1, S), True = a real source token, masks encoder self-attention and
        cross-attention keys; causal self-attention masks the future instead.
        """
        B, T, _ = x.shape
        q = self._heads(self.q_proj(x))  # (B, H, T, D)
        mask, is_causal = src_mask, False
        if self.kind == "cross":
            k, v = self._cross_kv(memory, cache)  # (B, H, S, D)
        else:
            k, v = self._heads(self.k_proj(x)), self._heads(self.v_proj(x))  # (B, H, T, D)
            if self.kind == "causal" and cache is None:
                mask, is_causal = None, T > 1
            elif self.kind == "causal":
                assert cache is not None
                # The static cache: written at the positions, attended whole under a mask.
                pos = torch.arange(cache.length, cache.length + T, device=x.device)  # (T,)
                k, v = cache.update(self.layer, k, v, pos)  # (B, H, max_len, D)
                mask, is_causal = cache.mask(pos, None), False  # (T, max_len)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal,
            dropout_p=self.cfg.dropout if self.training else 0.0,
        )  # (B, H, T, D)
        return self.out_proj(y.transpose(1, 2).reshape(B, T, self.cfg.n_embd))  # (B, T, C)

    def _cross_kv(self, memory: Tensor | None, cache: Seq2SeqCache | None) -> tuple[Tensor, Tensor]:
        """Keys and values (B, H, S, D) of the encoder output: from the cache after the first call."""
        if cache is not None and (kv := cache.cross[self.layer]) is not None:
            return kv
        assert memory is not None, "cross-attention needs the encoder output on its first call"
        kv = self._heads(self.k_proj(memory)), self._heads(self.v_proj(memory))
        if cache is not None:
            cache.cross[self.layer] = kv
        return kv


def activation(name: str) -> Callable[[Tensor], Tensor]:
    """The feed-forward nonlinearity named in the config."""
    return {"relu": F.relu, "gelu": F.gelu, "silu": F.silu}[name]


def residual(x: Tensor, norm: nn.LayerNorm, sublayer: Callable[[Tensor], Tensor],
             drop: nn.Dropout, pre: bool) -> Tensor:
    """Post-norm ``norm(x + drop(sublayer(x)))`` or pre-norm ``x + drop(sublayer(norm(x)))``."""
    if pre:
        return x + drop(sublayer(norm(x)))
    return norm(x + drop(sublayer(x)))


class EncoderLayer(nn.Module):
    """Self-attention over the source, then the feed-forward, each with its residual and norm."""

    def __init__(self, cfg: Seq2SeqConfig, layer: int) -> None:
        super().__init__()
        c, eps = cfg.n_embd, cfg.norm_eps
        self.pre = cfg.norm == "pre"
        self.self_attn = Attention(cfg, layer, "encoder")
        self.self_attn_layer_norm = nn.LayerNorm(c, eps=eps)
        self.fc1 = nn.Linear(c, cfg.ffn_dim)
        self.fc2 = nn.Linear(cfg.ffn_dim, c)
        self.final_layer_norm = nn.LayerNorm(c, eps=eps)
        self.act = activation(cfg.activation)
        self.drop = nn.Dropout(cfg.dropout)

    def ffn(self, x: Tensor) -> Tensor:
        """Position-wise feed-forward (B, L, C) -> (B, L, C): fc2(act(fc1(x)))."""
        return self.fc2(self.act(self.fc1(x)))

    def forward(self, x: Tensor, src_mask: Tensor | None) -> Tensor:
        """(B, S, C) -> (B, S, C)."""
        x = residual(x, self.self_attn_layer_norm,
                     lambda h: self.self_attn(h, None, src_mask, None), self.drop, self.pre)
        return residual(x, self.final_layer_norm, self.ffn, self.drop, self.pre)


class DecoderLayer(nn.Module):
    """Causal self-attention, cross-attention over the encoder output, then the feed-forward."""

    def __init__(self, cfg: Seq2SeqConfig, layer: int) -> None:
        super().__init__()
        c, eps = cfg.n_embd, cfg.norm_eps
        self.pre = cfg.norm == "pre"
        self.self_attn = Attention(cfg, layer, "causal")
        self.self_attn_layer_norm = nn.LayerNorm(c, eps=eps)
        self.encoder_attn = Attention(cfg, layer, "cross")
        self.encoder_attn_layer_norm = nn.LayerNorm(c, eps=eps)
        self.fc1 = nn.Linear(c, cfg.ffn_dim)
        self.fc2 = nn.Linear(cfg.ffn_dim, c)
        self.final_layer_norm = nn.LayerNorm(c, eps=eps)
        self.act = activation(cfg.activation)
        self.drop = nn.Dropout(cfg.dropout)

    def ffn(self, x: Tensor) -> Tensor:
        """Position-wise feed-forward (B, L, C) -> (B, L, C): fc2(act(fc1(x)))."""
        return self.fc2(self.act(self.fc1(x)))

    def forward(self, x: Tensor, memory: Tensor | None, src_mask: Tensor | None,
                cache: Seq2SeqCache | None) -> Tensor:
        """(B, T, C) -> (B, T, C); ``memory`` (B, S, C) may be None once ``cache`` holds it."""
        x = residual(x, self.self_attn_layer_norm,
                     lambda h: self.self_attn(h, None, None, cache), self.drop, self.pre)
        x = residual(x, self.encoder_attn_layer_norm,
                     lambda h: self.encoder_attn(h, memory, src_mask, cache), self.drop, self.pre)
        return residual(x, self.final_layer_norm, self.ffn, self.drop, self.pre)


class Stack(nn.Module):
    """Embed (scaled by sqrt(C)) + positions + dropout, run the layers, and (pre-norm) normalize.

    The encoder stack (HF MarianEncoder) and the decoder stack (MarianDecoder) differ only in
    their layers; ``embed_tokens`` is the shared matrix when embeddings are tied.
    """

    def __init__(self, cfg: Seq2SeqConfig, embed_tokens: nn.Embedding, decoder: bool) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = embed_tokens
        n = cfg.n_decoder_layer if decoder else cfg.n_encoder_layer
        layer_cls = DecoderLayer if decoder else EncoderLayer
        self.layers = nn.ModuleList(layer_cls(cfg, i) for i in range(n))
        self.layer_norm = nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps) if cfg.norm == "pre" else None
        self.drop = nn.Dropout(cfg.dropout)

    def embed(self, ids: Tensor, past: int, table: Tensor) -> Tensor:
        """ids (B, L) at positions past..past+L-1 -> (B, L, C)."""
        L = ids.shape[1]
        if past + L > self.cfg.block_size:
            raise ConfigError(
                f"block_size: the sequence needs {past + L} positions but the model's "
                f"block_size is {self.cfg.block_size}; shorten the input or raise block_size"
            )
        x = self.embed_tokens(ids) * math.sqrt(self.cfg.n_embd)  # (B, L, C), paper section 3.4
        return self.drop(x + table[past : past + L].to(x.dtype))  # (L, C) broadcast over B

    def finish(self, x: Tensor) -> Tensor:
        """The final LayerNorm of a pre-norm stack (a post-norm stack ends normalized already)."""
        return self.layer_norm(x) if self.layer_norm is not None else x


# --------------------------------------------------------------------------- model


class Seq2Seq(nn.Module):
    """Source ids (B, S) + target-side input ids (B, T) -> next-target-token logits (B, T, V).

    Training uses teacher forcing: ``tgt`` = BOS + target, labels = target + EOS. Generation
    encodes once (``encode``), then calls ``decode`` with a ``Seq2SeqCache`` one token at a time.
    Build on the meta device, then ``to_empty`` + ``init_weights(generator)`` (as ``Decoder``).
    """

    def __init__(self, cfg: Seq2SeqConfig) -> None:
        super().__init__()
        self.cfg = cfg
        c, v = cfg.n_embd, cfg.vocab_size
        # Tied: one matrix for source, target and output (HF Marian's model.shared); untied:
        # each stack owns its embedding and lm_head is separate.
        self.shared = nn.Embedding(v, c) if cfg.tie_embeddings else None
        src_emb = self.shared if self.shared is not None else nn.Embedding(v, c)
        tgt_emb = self.shared if self.shared is not None else nn.Embedding(v, c)
        self.encoder = Stack(cfg, src_emb, decoder=False)
        self.decoder = Stack(cfg, tgt_emb, decoder=True)
        self.lm_head = nn.Linear(c, v, bias=False)
        self._tie()
        # Derived, not learned: non-persistent (not in the state dict), recomputed on every move.
        self.register_buffer("pos_table", None, persistent=False)
        self.init_weights()

    def _tie(self) -> None:
        if self.cfg.tie_embeddings:
            assert self.shared is not None
            self.encoder.embed_tokens = self.decoder.embed_tokens = self.shared
            self.lm_head.weight = self.shared.weight

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> Seq2Seq:
        # As Decoder._apply: re-tie after to_empty (a move off the meta device makes one new
        # Parameter per module) and keep the position table valid and in fp32.
        super()._apply(fn, recurse)
        self._tie()
        self.init_buffers()
        return self

    def init_buffers(self) -> None:
        """(Re)compute the fp32 sinusoid table on the device of the weights."""
        w = self.lm_head.weight
        self.pos_table = sinusoid_table(self.cfg.block_size, self.cfg.n_embd, w.device)

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """Initialize every parameter; the same generator seed gives the same model.

        As fairseq's Transformer: Xavier-uniform linears, zero biases, embeddings normal with
        std C^-1/2 (so the sqrt(C)-scaled embedding has unit variance, like the positions),
        unit LayerNorms. The tied output head is the embedding, initialized once.
        """
        self.init_buffers()
        for name, module in self.named_modules():
            self.init_module(name, module, generator)

    @torch.no_grad()
    def init_module(self, name: str, module: nn.Module,
                    generator: torch.Generator | None = None) -> None:
        """Initialize the own parameters of the submodule called ``name`` (see ``init_weights``)."""
        if isinstance(module, nn.Linear):
            if name == "lm_head" and self.cfg.tie_embeddings:
                return
            nn.init.xavier_uniform_(module.weight, generator=generator)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, 0.0, self.cfg.n_embd ** -0.5, generator)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def new_cache(self, batch: int, max_len: int | None = None) -> Seq2SeqCache:
        """An empty cache for ``batch`` target sequences of up to ``max_len`` (default block_size)."""
        cfg, w = self.cfg, self.lm_head.weight
        max_len = cfg.block_size if max_len is None else min(max_len, cfg.block_size)
        return Seq2SeqCache(cfg.n_decoder_layer, batch, cfg.n_head, max_len, cfg.head_dim,
                            w.dtype, w.device)

    def encode(self, src: Tensor, src_mask: Tensor | None = None) -> Tensor:
        """Source ids (B, S) -> encoder output (B, S, C); ``src_mask`` (B, S) is True/1 on real tokens."""
        mask = _key_mask(src_mask)
        x = self.encoder.embed(src, 0, self.pos_table)  # (B, S, C)
        for layer in self.encoder.layers:
            x = layer(x, mask)
        return self.encoder.finish(x)

    def decode(self, tgt: Tensor, memory: Tensor | None, src_mask: Tensor | None = None,
               cache: Seq2SeqCache | None = None) -> Tensor:
        """Target-side ids (B, T) -> logits (B, T, V), attending to ``memory`` (B, S, C).

        With a cache, ``tgt`` continues the cached target (positions from ``cache.length``),
        cross-attention reuses the keys/values cached by the first call (``memory`` may then be
        None), and the cache advances by T.
        """
        B, T = tgt.shape
        past = 0 if cache is None else cache.length
        if cache is not None and (past + T > cache.max_len or cache.batch != B):
            raise ValueError(f"cache holds {cache.batch} x {cache.max_len} positions; "
                             f"got {B} x {past} + {T}")
        mask = _key_mask(src_mask)
        x = self.decoder.embed(tgt, past, self.pos_table)  # (B, T, C)
        for layer in self.decoder.layers:
            x = layer(x, memory, mask, cache)
        if cache is not None:
            cache.length = past + T
        return self.lm_head(self.decoder.finish(x))  # (B, T, V)

    def forward(self, src: Tensor, tgt: Tensor, src_mask: Tensor | None = None) -> Tensor:
        """Teacher-forced logits (B, T, V) for sources (B, S) and target-side inputs (B, T)."""
        return self.decode(tgt, self.encode(src, src_mask), src_mask)

    def num_params(self) -> int:
        """Parameter count, tied weights once."""
        return sum(p.numel() for p in self.parameters())


def _key_mask(src_mask: Tensor | None) -> Tensor | None:
    """(B, S) source mask, 1 = real token -> SDPA's boolean (B, 1, 1, S), or None."""
    return None if src_mask is None else src_mask.bool()[:, None, None, :]

"""An encoder-only transformer: BERT (Devlin et al. 2018), with a masked-LM and a classifier head.

Reads top to bottom as the architecture: the config, then the components in forward order
(embeddings, self-attention, add & norm, feed-forward, layer, pooler), the shared ``Encoder``
body, the two heads, and the two models with ``init_weights()``.

BERT is post-norm: every sub-layer is ``LayerNorm(x + dropout(sublayer(x)))``, the embeddings are
normalized once before the first layer, the MLP uses exact (erf) GELU, and attention sees the
whole sequence except padding (no causal mask).

Weight names mirror Hugging Face ``BertForMaskedLM`` / ``BertForSequenceClassification``
exactly, so the conversion is the identity map on state-dict keys::

    bert.embeddings.{word,position,token_type}_embeddings.weight, bert.embeddings.LayerNorm.*
    bert.encoder.layer.N.attention.self.{query,key,value}.*
    bert.encoder.layer.N.attention.output.{dense,LayerNorm}.*
    bert.encoder.layer.N.intermediate.dense.*, bert.encoder.layer.N.output.{dense,LayerNorm}.*
    bert.pooler.dense.*                                  (classification only, as in HF)
    cls.predictions.transform.{dense,LayerNorm}.*, cls.predictions.bias   (masked LM)
    cls.predictions.decoder.{weight,bias}: tied to word_embeddings.weight / cls.predictions.bias
    classifier.*                                         (classification)

HF config: hidden_size = n_embd, num_hidden_layers = n_layer, num_attention_heads = n_head,
intermediate_size = ffn_dim, max_position_embeddings = block_size, type_vocab_size,
layer_norm_eps = norm_eps, hidden_dropout_prob = attention_probs_dropout_prob = dropout,
hidden_act = "gelu", num_labels, pad_token_id = the tokenizer's [PAD] id (HF's padding_idx only
freezes that embedding row's gradient; the forward is the same). HF keeps non-persistent
position_ids/token_type_ids buffers; we keep none.

Shapes: B batch, T tokens, C = n_embd, H = n_head, D = head_dim, F = ffn_dim, V = vocab_size.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmforge.config import ConfigError

# --------------------------------------------------------------------------- config


@dataclass
class EncoderConfig:
    """Shape of a BERT-style encoder. Defaults: a ~4M model (BERT-mini shape, vocab 4096)."""

    vocab_size: int = 4096
    """Number of token ids; a pretrain recipe replaces it with its tokenizer's vocabulary size."""
    block_size: int = 256
    """Maximum sequence length in tokens, [CLS] and [SEP] included (HF max_position_embeddings)."""
    type_vocab_size: int = 2
    """Number of token types (segment A/B of a sentence pair)."""
    n_layer: int = 4
    """Number of transformer layers."""
    n_head: int = 4
    """Number of attention heads; must divide n_embd."""
    n_embd: int = 256
    """Width of the hidden states (HF hidden_size)."""
    intermediate_size: int | None = None
    """Hidden width of the feed-forward layer; null = 4*n_embd."""
    norm_eps: float = 1e-12
    """Epsilon inside LayerNorm (BERT uses 1e-12)."""
    dropout: float = 0.0
    """Dropout on embeddings, attention weights, residual branches and before the classifier (BERT pretraining used 0.1)."""
    init_std: float = 0.02
    """Standard deviation of the normal init of weights and embeddings (BERT: 0.02)."""
    num_labels: int = 2
    """Number of classes of the sequence-classification head (unused by the masked LM)."""

    def __post_init__(self) -> None:
        for name in ("vocab_size", "block_size", "type_vocab_size", "n_layer", "n_head", "n_embd",
                     "num_labels"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}: must be a positive integer, got {getattr(self, name)}")
        if self.intermediate_size is not None and self.intermediate_size <= 0:
            raise ConfigError(f"intermediate_size: must be positive or null, got {self.intermediate_size}")
        if self.n_embd % self.n_head:
            raise ConfigError(
                f"n_head: {self.n_head} does not divide n_embd={self.n_embd}; "
                "choose n_head so that n_embd % n_head == 0"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout: must be in [0, 1), got {self.dropout}")
        for name in ("norm_eps", "init_std"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}: must be positive, got {getattr(self, name)}")

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.n_embd // self.n_head

    @property
    def ffn_dim(self) -> int:
        """Resolved feed-forward hidden width."""
        return 4 * self.n_embd if self.intermediate_size is None else self.intermediate_size


Head = Literal["mlm", "classify", "none"]


def count_params(cfg: EncoderConfig, head: Head = "mlm") -> int:
    """Parameter count of a model predicted from the config alone (tied weights once).

    ``head``: "mlm" = ``EncoderForMaskedLM`` (no pooler, as HF BertForMaskedLM),
    "classify" = ``EncoderForClassification``, "none" = ``Encoder`` with its pooler.
    """
    c, f, v = cfg.n_embd, cfg.ffn_dim, cfg.vocab_size
    emb = (v + cfg.block_size + cfg.type_vocab_size) * c + 2 * c
    layer = 4 * (c * c + c) + (c * f + f) + (f * c + c) + 2 * (2 * c)
    body = emb + cfg.n_layer * layer
    pooler = c * c + c
    if head == "mlm":
        return body + (c * c + c) + 2 * c + v  # transform dense + LayerNorm, output bias
    if head == "classify":
        return body + pooler + c * cfg.num_labels + cfg.num_labels
    return body + pooler


# --------------------------------------------------------------------------- components


class Embeddings(nn.Module):
    """Token + position + token-type embeddings, then LayerNorm and dropout."""

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.position_embeddings = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.n_embd)
        self.LayerNorm = nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, input_ids: Tensor, token_type_ids: Tensor | None) -> Tensor:
        """ids (B, T) -> (B, T, C)."""
        T = input_ids.shape[1]
        x = self.word_embeddings(input_ids)  # (B, T, C)
        x = x + self.position_embeddings(torch.arange(T, device=input_ids.device))  # (T, C)
        if token_type_ids is None:
            x = x + self.token_type_embeddings.weight[0]  # every token is segment A
        else:
            x = x + self.token_type_embeddings(token_type_ids)  # (B, T, C)
        return self.dropout(self.LayerNorm(x))


class SelfAttention(nn.Module):
    """Bidirectional multi-head attention: every token sees every non-padding token."""

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.query = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.key = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.value = nn.Linear(cfg.n_embd, cfg.n_embd)

    def forward(self, x: Tensor, mask: Tensor | None) -> Tensor:
        """x (B, T, C), mask (B, 1, 1, T) True = attend -> (B, T, C), before the output dense."""
        B, T, _ = x.shape
        H, D = self.cfg.n_head, self.cfg.head_dim
        q = self.query(x).view(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
        k = self.key(x).view(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
        v = self.value(x).view(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.cfg.dropout if self.training else 0.0
        )  # (B, H, T, D)
        return y.transpose(1, 2).reshape(B, T, H * D)  # (B, T, C)


class AddNorm(nn.Module):
    """dense -> dropout -> add the residual -> LayerNorm: the post-norm end of a sub-layer."""

    def __init__(self, cfg: EncoderConfig, in_features: int) -> None:
        super().__init__()
        self.dense = nn.Linear(in_features, cfg.n_embd)
        self.LayerNorm = nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, h: Tensor, residual: Tensor) -> Tensor:
        """h (B, T, in_features), residual (B, T, C) -> (B, T, C)."""
        return self.LayerNorm(self.dropout(self.dense(h)) + residual)


class Attention(nn.Module):
    """Self-attention plus its add & norm (HF BertAttention: ``self`` and ``output``)."""

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.self = SelfAttention(cfg)
        self.output = AddNorm(cfg, cfg.n_embd)

    def forward(self, x: Tensor, mask: Tensor | None) -> Tensor:
        """(B, T, C) -> (B, T, C)."""
        return self.output(self.self(x, mask), x)


class Intermediate(nn.Module):
    """The first half of the feed-forward layer: dense to F, exact GELU."""

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.n_embd, cfg.ffn_dim)

    def forward(self, x: Tensor) -> Tensor:
        """(B, T, C) -> (B, T, F)."""
        # The exact erf GELU, BERT's "gelu" (GPT-2's decoder uses the tanh approximation).
        return F.gelu(self.dense(x))


class Layer(nn.Module):
    """One post-norm encoder layer: attention + add & norm, feed-forward + add & norm."""

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.attention = Attention(cfg)
        self.intermediate = Intermediate(cfg)
        self.output = AddNorm(cfg, cfg.ffn_dim)

    def forward(self, x: Tensor, mask: Tensor | None) -> Tensor:
        """(B, T, C) -> (B, T, C)."""
        x = self.attention(x, mask)
        return self.output(self.intermediate(x), x)


class LayerStack(nn.Module):
    """The layers in order (HF BertEncoder, whose only child is ``layer``)."""

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList(Layer(cfg) for _ in range(cfg.n_layer))

    def forward(self, x: Tensor, mask: Tensor | None) -> Tensor:
        """(B, T, C) -> (B, T, C)."""
        for layer in self.layer:
            x = layer(x, mask)
        return x


class Pooler(nn.Module):
    """The sequence summary: dense + tanh on the first ([CLS]) token's hidden state."""

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.n_embd, cfg.n_embd)

    def forward(self, hidden: Tensor) -> Tensor:
        """(B, T, C) -> (B, C)."""
        return torch.tanh(self.dense(hidden[:, 0]))


def padding_mask(attention_mask: Tensor | None) -> Tensor | None:
    """HF-style (B, T) mask, 1 = real token, 0 = padding -> SDPA's boolean (B, 1, 1, T) or None.

    A row of only padding would attend to nothing (NaN); every sequence needs a real token.
    """
    if attention_mask is None:
        return None
    return attention_mask.bool()[:, None, None, :]  # (B, 1, 1, T), broadcast over H and queries


class Encoder(nn.Module):
    """The shared body (HF BertModel): token ids (B, T) -> hidden states (B, T, C) [+ pooled]."""

    def __init__(self, cfg: EncoderConfig, add_pooler: bool = True) -> None:
        super().__init__()
        self.cfg = cfg
        self.embeddings = Embeddings(cfg)
        self.encoder = LayerStack(cfg)
        self.pooler = Pooler(cfg) if add_pooler else None

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """(hidden (B, T, C), pooled (B, C) or None without a pooler)."""
        length = input_ids.shape[1]
        if length > self.cfg.block_size:
            raise ConfigError(
                f"block_size: the sequence has {length} tokens but the model's block_size is "
                f"{self.cfg.block_size}; shorten the input or raise block_size"
            )
        x = self.embeddings(input_ids, token_type_ids)  # (B, T, C)
        x = self.encoder(x, padding_mask(attention_mask))  # (B, T, C)
        return x, (self.pooler(x) if self.pooler is not None else None)


# --------------------------------------------------------------------------- heads


class PredictionTransform(nn.Module):
    """dense + GELU + LayerNorm applied to every hidden state before the vocabulary projection."""

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.LayerNorm = nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps)

    def forward(self, x: Tensor) -> Tensor:
        """(B, T, C) -> (B, T, C)."""
        return self.LayerNorm(F.gelu(self.dense(x)))


class PredictionHead(nn.Module):
    """Transform, then project onto the vocabulary with the (tied) word embeddings + a bias."""

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.transform = PredictionTransform(cfg)
        self.decoder = nn.Linear(cfg.n_embd, cfg.vocab_size)  # weight, bias tied by the model
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))

    def forward(self, x: Tensor) -> Tensor:
        """(B, T, C) -> logits (B, T, V)."""
        return self.decoder(self.transform(x))


class MaskedLMHead(nn.Module):
    """HF BertOnlyMLMHead: a wrapper whose only child is ``predictions`` (kept for the names)."""

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.predictions = PredictionHead(cfg)

    def forward(self, x: Tensor) -> Tensor:
        """(B, T, C) -> (B, T, V)."""
        return self.predictions(x)


# --------------------------------------------------------------------------- models


@torch.no_grad()
def _init_bert(model: nn.Module, name: str, module: nn.Module, std: float,
               generator: torch.Generator | None) -> None:
    """BERT's init of one submodule's own parameters: normal(0, std) for linears and
    embeddings, zero biases, unit LayerNorms."""
    if isinstance(module, nn.Linear):
        if isinstance(model, EncoderForMaskedLM) and name == "cls.predictions.decoder":
            return  # tied: the word embeddings and the output bias are initialized once
        nn.init.normal_(module.weight, 0.0, std, generator)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, 0.0, std, generator)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
    elif isinstance(module, PredictionHead):
        nn.init.zeros_(module.bias)


class _BertInit(nn.Module):
    """``init_weights`` / ``init_module`` of the BERT heads (BERT's init, ``_init_bert``)."""

    cfg: EncoderConfig

    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """Initialize every parameter; the same generator seed gives the same model."""
        for name, module in self.named_modules():
            self.init_module(name, module, generator)

    @torch.no_grad()
    def init_module(self, name: str, module: nn.Module,
                    generator: torch.Generator | None = None) -> None:
        """Initialize the own parameters of the submodule called ``name`` (see ``init_weights``)."""
        _init_bert(self, name, module, self.cfg.init_std, generator)


class EncoderForMaskedLM(_BertInit):
    """Token ids (B, T) -> masked-LM logits (B, T, V) at every position.

    Build on the meta device, then ``to_empty`` + ``init_weights(generator)`` (as ``Decoder``).
    The loss (cross-entropy on the masked positions, -100 elsewhere) is computed by the caller.
    """

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.bert = Encoder(cfg, add_pooler=False)  # HF BertForMaskedLM has no pooler
        self.cls = MaskedLMHead(cfg)
        self._tie()
        self.init_weights()

    def _tie(self) -> None:
        head = self.cls.predictions
        head.decoder.weight = self.bert.embeddings.word_embeddings.weight
        head.decoder.bias = head.bias

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> EncoderForMaskedLM:
        # A move off the meta device (to_empty) makes a new Parameter per module, silently
        # untying the decoder from the embeddings: tie them again after every _apply.
        super()._apply(fn, recurse)
        self._tie()
        return self

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
    ) -> Tensor:
        """Logits (B, T, V) for ids (B, T); ``attention_mask`` (B, T) is 1 for real tokens."""
        hidden, _ = self.bert(input_ids, attention_mask, token_type_ids)  # (B, T, C)
        return self.cls(hidden)  # (B, T, V)

    def num_params(self) -> int:
        """Parameter count, tied weights once."""
        return sum(p.numel() for p in self.parameters())


class EncoderForClassification(_BertInit):
    """Token ids (B, T) -> class logits (B, num_labels) from the pooled [CLS] state."""

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.bert = Encoder(cfg, add_pooler=True)
        self.dropout = nn.Dropout(cfg.dropout)
        self.classifier = nn.Linear(cfg.n_embd, cfg.num_labels)
        self.init_weights()

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
    ) -> Tensor:
        """Class logits (B, num_labels) for ids (B, T)."""
        _, pooled = self.bert(input_ids, attention_mask, token_type_ids)  # (B, C)
        assert pooled is not None
        return self.classifier(self.dropout(pooled))  # (B, num_labels)

    def num_params(self) -> int:
        """Parameter count."""
        return sum(p.numel() for p in self.parameters())


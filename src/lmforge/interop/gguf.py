"""GGUF files (llama.cpp's format) in and out, for the decoder families llama.cpp runs.

A GGUF file is one binary holding metadata (key/value pairs: the architecture's shape, the
tokenizer's vocabulary and merges, the chat template) and named tensors, each in its own type
(F32, F16, BF16, or a block-quantized type such as Q8_0, Q4_0, Q4_1). We follow the names and
keys of llama.cpp's ``convert_hf_to_gguf.py`` for six of its architectures, chosen from our
config the way the converter chooses them from a Hugging Face architecture:

=======  ======================================  =============================================
arch     our config                              difference in the file
=======  ======================================  =============================================
llama    rope/rmsnorm/swiglu (Llama, SmolLM)     q/k rows permuted; Llama 3.1 rope: rope_freqs
qwen2    the same + ``qkv_bias``                 attn_q/k/v.bias; q/k not permuted (NeoX rope)
qwen3    the same + ``qk_norm``                  attn_q_norm / attn_k_norm; not permuted
gpt2     learned/layernorm/gelu + biases         position_embd; q, k, v fused as attn_qkv
gemma2   Gemma's fields (rmsnorm1p, geglu, ...)  norms stored as 1 + w; post_attention_norm,
                                                 post_ffw_norm; soft caps, sliding window keys
gemma3   the same + ``qk_norm``                  attn_q/k_norm; rope.freq_base_swa (local RoPE)
=======  ======================================  =============================================

==========================  =====================================================
ours                        GGUF
==========================  =====================================================
tok_emb / pos_emb           token_embd / position_embd
blocks.N.attn_norm          blk.N.attn_norm
blocks.N.attn.{q,k,v,o}     blk.N.attn_q / attn_k / attn_v / attn_output (gpt2: attn_qkv)
blocks.N.attn.{q,k}_norm    blk.N.attn_q_norm / attn_k_norm
blocks.N.attn_post_norm     blk.N.post_attention_norm (Gemma's sandwich norms)
blocks.N.mlp_norm           blk.N.ffn_norm
blocks.N.mlp_post_norm      blk.N.post_ffw_norm
blocks.N.mlp.{gate,up,down} blk.N.ffn_gate / ffn_up / ffn_down (gpt2: fc_in, fc_out = up, down)
norm_f                      output_norm
lm_head.weight              output.weight (absent when tied to token_embd)
==========================  =====================================================

The permutation: our RoPE rotates the two halves of each head (HF's ``rotate_half``), while
llama.cpp's ``llama`` rope rotates adjacent pairs (x[2i], x[2i+1]). The converter therefore
reorders the rows of q and k within each head so that pair i holds our rows i and i + D/2;
writing applies that order and reading undoes it. qwen2 and qwen3 use llama.cpp's NeoX rope,
which rotates halves as we do: their rows are stored as they are. Everything else is stored
as is: a GGUF tensor of shape [ne0, ne1] is our (out, in) = (ne1, ne0) matrix, row-major.

Gemma (llama.cpp's ``gemma2``/``gemma3`` graphs, read in the llama.cpp that llama-cpp-python
0.3.36 vendors): its RMSNorm gain (1 + w) is stored as the plain gain 1 + w, as the converter
adds 1 to every ``*norm.weight``; the sqrt(n_embd) embedding scale and GeGLU are implied by the
architecture. Which layers slide is ``attention.sliding_window_pattern``: absent, llama.cpp
takes every 2nd layer global (gemma2) or every 6th (gemma3), the layouts of the released
models, so the key is written (as one bool per layer) only for another layout. The attention
scale has no key: llama.cpp uses head_dim**-0.5, or (n_embd // n_head)**-0.5 for the 46-layer
Gemma 2 and 62-layer Gemma 3 (the 27B models), so any other ``query_pre_attn_scalar`` is refused.
gemma2 always caps (attention 50, logits 30 when the keys are absent) and ties its head.

The tokenizer's pre-type (``tokenizer.ggml.pre``, which of llama.cpp's built-in split rules
it runs) is chosen as the converter chooses it: the sha256 of the ids of its check text,
looked up in the converter's table; a tokenizer trained here has no entry there, so its
pre-tokenizer is then recognized by structure (GPT-2's regex, SmolLM's digits, Llama 3's
or Qwen2's split regex).

A SentencePiece-style tokenizer.json (byte-fallback BPE, "▁" for spaces: Llama 2, Mistral,
Phi-3, Gemma) is written as a ``llama`` vocabulary, as the converter's ``gguf.LlamaHfVocab``
writes one without tokenizer.model (tokens, BYTE/CONTROL types), but scored by merge rank rather
than its -1000 placeholder (see merge_scores); it is read back through transformers' GGUF
tokenizer converter.

The ``gguf`` package (llama.cpp's own Python reader/writer) is imported only inside functions
of this module, so lmforge works without it until a GGUF is read or written.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from hashlib import sha256
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lmforge.config import ConfigError, UserError
from lmforge.models.decoder import (
    Decoder,
    DecoderConfig,
    RMSNorm1p,
    RopeScaling,
    rope_frequencies,
)

MAGIC = b"GGUF"
ARCHS = ("llama", "qwen2", "qwen3", "gpt2", "gemma2", "gemma3")
INSTALL = "pip install gguf (or pip install 'lmforge[export]')"
# --gguf_type -> (GGML type of matrices, GGML type of the embedding and head, llama.cpp file type)
# Q4_0 keeps token_embd/output at Q8_0, as llama.cpp keeps its output at a higher precision:
# they are the most sensitive tensors, and SmolLM2's own Q4_1 file does the same.
TYPES = {
    "f32": ("F32", "F32", "ALL_F32"),
    "f16": ("F16", "F16", "MOSTLY_F16"),
    "bf16": ("BF16", "BF16", "MOSTLY_BF16"),
    "q8_0": ("Q8_0", "Q8_0", "MOSTLY_Q8_0"),
    "q4_0": ("Q4_0", "Q8_0", "MOSTLY_Q4_0"),
}
_TOP = {"tok_emb": "token_embd", "pos_emb": "position_embd", "norm_f": "output_norm",
        "lm_head": "output"}
_IN_BLOCK = {
    "attn_norm": "attn_norm", "attn.q_proj": "attn_q", "attn.k_proj": "attn_k",
    "attn.v_proj": "attn_v", "attn.o_proj": "attn_output", "attn.q_norm": "attn_q_norm",
    "attn.k_norm": "attn_k_norm", "mlp_norm": "ffn_norm", "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down", "mlp.fc_in": "ffn_up",
    "mlp.fc_out": "ffn_down", "attn_post_norm": "post_attention_norm",
    "mlp_post_norm": "post_ffw_norm",
}
BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")  # a byte-fallback piece
_QKV = ("attn.q_proj", "attn.k_proj", "attn.v_proj")  # fused, in this order, as gpt2's attn_qkv
ROPE_FREQS = "rope_freqs.weight"
# llama.cpp's gemma graphs (src/models/gemma2.cpp, gemma3.cpp): with no sliding_window_pattern
# key every GEMMA_EVERY-th layer is global; at the 27B models' layer count the attention scale
# is (n_embd // n_head)**-0.5 instead of head_dim**-0.5; gemma2's caps when their keys are absent.
GEMMA_EVERY = {"gemma2": 2, "gemma3": 6}
GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3": 62}
GEMMA2_CAPS = (50.0, 30.0)  # attention, final logits
GEMMA2_WINDOW = 4096
# tokenizer.ggml.token_type values (llama.cpp's llama_token_type)
NORMAL, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 3, 4, 5, 6
# Source metadata an import keeps and an export writes back (beyond what we compute):
# every general.* key but these, and these tokenizer ids.
_OWN_GENERAL = ("general.architecture", "general.type", "general.file_type",
                "general.quantization_version", "general.alignment")
_KEPT_IDS = tuple(f"tokenizer.ggml.{k}_token_id" for k in (
    "unknown", "padding", "seperator", "mask", "eot", "eom"))  # "seperator": llama.cpp's spelling

# Split regexes of the byte-level BPE pre-tokenizers, as Hugging Face tokenizer.json files hold
# them (llama.cpp compiles an equivalent of each, selected by the tokenizer.ggml.pre name).
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")
_SPLITS = {"llama-bpe": LLAMA3_SPLIT, "qwen2": QWEN2_SPLIT}
# convert_hf_to_gguf.py's get_vocab_base_pre: the text whose token ids identify a tokenizer ...
CHECK_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis "
    "concatenated) ✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 "
    "កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= нещо на Български "
    "''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? 'M not "
    "sure I'll make it, 'D you like some tea? We'Ve a'lL")
# ... and the sha256 of str(ids) -> pre-type, for the families lmforge exports (from its table).
KNOWN_HASHES = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Llama 3
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen1.5/2/2.5
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",  # Qwen3
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # SmolLM 1/2
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",  # GPT-2
}


def _gguf() -> Any:
    """The ``gguf`` package, or a UserError that says how to install it."""
    try:
        import gguf
    except ImportError:
        raise UserError(f"reading and writing GGUF files needs the gguf package; {INSTALL}"
                        ) from None
    return gguf


def is_gguf(path: Path) -> bool:
    """True when ``path`` is a file that starts with the GGUF magic bytes."""
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        return f.read(4) == MAGIC


# --------------------------------------------------------------------------- names and layout


def gguf_name(ours: str, arch: str = "llama") -> str:
    """The llama.cpp name of one of our state-dict keys (``blocks.3.attn.q_proj.weight``)."""
    module, _, param = ours.rpartition(".")
    if module in _TOP:
        return f"{_TOP[module]}.{param}"
    _, layer, rest = module.split(".", 2)
    name = "attn_qkv" if arch == "gpt2" and rest in _QKV else _IN_BLOCK[rest]
    return f"blk.{layer}.{name}.{param}"


def permute_qk(w: Tensor, n_head: int) -> Tensor:
    """Our rotate-half row order of q or k (n_head*D, C) -> llama.cpp's interleaved pairs."""
    rows, *rest = w.shape
    # (H, 2, D/2, C): half, then index in half -> (H, D/2, 2, C): pair index, then half
    return w.reshape(n_head, 2, rows // n_head // 2, *rest).transpose(1, 2).reshape(w.shape)


def unpermute_qk(w: Tensor, n_head: int) -> Tensor:
    """Inverse of ``permute_qk``: llama.cpp's q/k rows back into our rotate-half order."""
    rows, *rest = w.shape
    return w.reshape(n_head, rows // n_head // 2, 2, *rest).transpose(1, 2).reshape(w.shape)


def _heads_of(ours: str, cfg: DecoderConfig, arch: str) -> int | None:
    """Heads to (un)permute a tensor by (llama only): n_head for q, the KV heads for k."""
    if arch != "llama":
        return None
    if ours.endswith("attn.q_proj.weight"):
        return cfg.n_head
    if ours.endswith("attn.k_proj.weight"):
        return cfg.kv_heads
    return None


def gemma_pattern(every: int, n_layer: int) -> list[bool]:
    """Which layers slide when every ``every``-th is global (0: all slide): llama.cpp's
    ``llama_hparams::set_swa_pattern``."""
    return [every == 0 or i % every < every - 1 for i in range(n_layer)]


def gemma_attention_scalar(arch: str, n_layer: int, n_embd: int, n_head: int,
                           head_dim: int) -> int:
    """The query_pre_attn_scalar of llama.cpp's gemma2/gemma3 graphs (they have no key for it)."""
    return n_embd // n_head if n_layer == GEMMA_27B_LAYERS[arch] else head_dim


def _gemma_arch(cfg: DecoderConfig) -> str:
    """gemma3 (q/k norms) or gemma2 for a Gemma-style ``cfg``, or a UserError naming the field
    that llama.cpp's graph computes otherwise."""

    def refuse(name: str, why: str) -> UserError:
        return UserError(f"model.{name}: {why}; export with --format hf or onnx")

    for name, want in (("pos", "rope"), ("norm", "rmsnorm1p"), ("mlp", "geglu"),
                       ("embed_scale", True), ("sandwich_norm", True), ("bias", False),
                       ("qkv_bias", False)):
        if getattr(cfg, name) != want:
            raise refuse(name, f"llama.cpp's gemma2/gemma3 need {name}={want} with the other "
                         "Gemma fields (norm rmsnorm1p, mlp geglu, embed_scale, sandwich_norm), "
                         f"got {getattr(cfg, name)}")
    arch = "gemma3" if cfg.qk_norm else "gemma2"
    rs, has_local = cfg.rope_scaling, any(cfg.window(i) is not None for i in range(cfg.n_layer))
    if rs.type not in ("none", "linear"):
        raise refuse("rope_scaling", f"llama.cpp's {arch} takes rope_scaling none or linear, "
                     f"not {rs.type}")
    scalar = gemma_attention_scalar(arch, cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.head_dim)
    if float(cfg.query_pre_attn_scalar or cfg.head_dim) != scalar:
        raise refuse("query_pre_attn_scalar", f"llama.cpp's {arch} with {cfg.n_layer} layers "
                     f"scales attention by {scalar}**-0.5 (head_dim, or n_embd // n_head at the "
                     f"27B models' layer count) and has no key for {cfg.query_pre_attn_scalar}")
    if arch == "gemma3":
        if cfg.attn_softcap is not None:
            raise refuse("attn_softcap", "llama.cpp's gemma3 does not cap attention scores")
        if cfg.rope_local_theta is None and has_local and rs.type != "none":
            raise refuse("rope_local_theta", "llama.cpp's gemma3 gives the sliding layers RoPE "
                         "without rope_scaling; set rope_local_theta")
        return arch
    for name in ("attn_softcap", "logit_softcap"):
        if getattr(cfg, name) is None:
            raise refuse(name, "llama.cpp's gemma2 always soft-caps (50 and 30 when unset)")
    if not cfg.tie_embeddings:
        raise refuse("tie_embeddings", "llama.cpp's gemma2 reuses token_embd as its head")
    if not has_local:
        raise refuse("sliding_window", "llama.cpp's gemma2 always has sliding layers (window "
                     f"{GEMMA2_WINDOW} when unset)")
    if cfg.rope_local_theta is not None and rs.type != "none":
        raise refuse("rope_local_theta", "llama.cpp's gemma2 keeps rope_scaling on the "
                     "sliding layers")
    return arch


def gguf_arch(cfg: DecoderConfig) -> str:
    """The llama.cpp architecture that computes what ``cfg`` does, or a UserError naming the
    field that none of llama, qwen2, qwen3, gpt2, gemma2, gemma3 has."""
    if cfg.norm == "rmsnorm1p" or cfg.mlp == "geglu" or cfg.embed_scale or cfg.sandwich_norm:
        return _gemma_arch(cfg)
    for name in ("local_layers", "query_pre_attn_scalar", "attn_softcap", "logit_softcap",
                 "rope_local_theta"):
        if getattr(cfg, name) is not None:
            raise UserError(f"model.{name}: of llama.cpp's architectures only gemma2/gemma3 "
                            f"have {name}, and this model is not a Gemma (norm rmsnorm1p, mlp "
                            "geglu, embed_scale, sandwich_norm); export with --format hf or onnx")
    style = (cfg.pos, cfg.norm, cfg.mlp)
    if style == ("learned", "layernorm", "gelu"):
        for name, bad in (("bias", not cfg.bias), ("n_kv_head", cfg.kv_heads != cfg.n_head),
                          ("sliding_window", cfg.sliding_window is not None),
                          ("head_size", cfg.head_size is not None), ("qk_norm", cfg.qk_norm)):
            if bad:
                raise UserError(f"model.{name}: llama.cpp's gpt2 architecture has no "
                                f"{name}={getattr(cfg, name)}; export with --format hf or onnx")
        return "gpt2"
    if style != ("rope", "rmsnorm", "swiglu"):
        raise UserError(
            f"model.pos/norm/mlp: {'/'.join(style)} has no llama.cpp architecture; GGUF holds "
            "rope/rmsnorm/swiglu (llama, qwen2, qwen3) or learned/layernorm/gelu (gpt2)")
    for name, bad in (("bias", cfg.bias), ("sliding_window", cfg.sliding_window is not None),
                      ("qkv_bias", cfg.qkv_bias and cfg.qk_norm)):
        if bad:
            raise UserError(f"model.{name}: none of llama.cpp's llama, qwen2, qwen3 "
                            f"architectures has {name} with this config; export with --format "
                            "hf or onnx instead")
    arch = "qwen3" if cfg.qk_norm else "qwen2" if cfg.qkv_bias else "llama"
    kind = cfg.rope_scaling.type
    if kind == "yarn" or (kind == "llama3" and arch != "llama"):
        raise UserError(f"model.rope_scaling: lmforge's GGUF export writes rope_scaling "
                        f"{kind} for llama only, linear for all; export with --format hf "
                        "or onnx instead")
    return arch


def _llama3_factors(cfg: DecoderConfig) -> Tensor:
    """llama.cpp's rope_freqs (D/2,): plain frequency / Llama 3.1 frequency, per pair."""
    plain = dataclasses.replace(cfg, rope_scaling=RopeScaling())
    base, _ = rope_frequencies(plain, torch.device("cpu"))
    scaled, _ = rope_frequencies(cfg, torch.device("cpu"))
    return (base / scaled).float()


def norm_offset(model: Decoder, ours: str) -> float:
    """1.0 for the weight of a Gemma norm (we hold w, applying 1 + w; GGUF holds 1 + w), else 0."""
    return 1.0 if isinstance(model.get_submodule(ours.rpartition(".")[0]), RMSNorm1p) else 0.0


def gguf_tensors(model: Decoder, arch: str) -> dict[str, Tensor]:
    """Every tensor the file holds, by llama.cpp name, in fp32 (permuted, fused, shifted)."""
    cfg = model.cfg
    parts: dict[str, list[Tensor]] = {}
    for ours, t in model.state_dict().items():
        if ours == "lm_head.weight" and cfg.tie_embeddings:
            continue
        t = t.detach().float().cpu()
        offset = norm_offset(model, ours)
        if offset:
            t = t + offset
        heads = _heads_of(ours, cfg, arch)
        parts.setdefault(gguf_name(ours, arch), []).append(permute_qk(t, heads) if heads else t)
    out = {name: torch.cat(ts) if len(ts) > 1 else ts[0] for name, ts in parts.items()}
    if cfg.rope_scaling.type == "llama3":
        out[ROPE_FREQS] = _llama3_factors(cfg)
    return out


# --------------------------------------------------------------------------- reading


def _plain(value: Any) -> Any:
    """A metadata value as plain Python (numpy scalars and arrays from the reader)."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


@dataclass
class GGUFFile:
    """The metadata and tensor index of a .gguf file (tensors stay memory-mapped)."""

    path: Path
    meta: dict[str, Any]
    tensors: dict[str, Any]  # name -> gguf.ReaderTensor
    types: Counter[str] = field(default_factory=Counter)

    @classmethod
    def open(cls, path: Path) -> GGUFFile:
        """Read the header of ``path`` with gguf's reader; UserError if it is no GGUF file."""
        gguf = _gguf()
        try:
            reader = gguf.GGUFReader(str(path))
        except FileNotFoundError:
            raise UserError(f"{path}: no such file") from None
        except Exception as e:  # the reader raises ValueError/struct errors for a bad file
            raise UserError(f"{path}: cannot read it as GGUF ({type(e).__name__}: {e})"
                            ) from None
        meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
        tensors = {t.name: t for t in reader.tensors}
        types = Counter(t.tensor_type.name for t in reader.tensors)
        return cls(path, meta, tensors, types)

    @property
    def arch(self) -> str:
        """general.architecture, or a UserError when lmforge does not read it."""
        arch = self.meta.get("general.architecture")
        if arch not in ARCHS:
            raise UserError(f"{self.path}: general.architecture is {arch!r}; lmforge reads "
                            f"{', '.join(ARCHS)}")
        return str(arch)

    def need(self, key: str) -> Any:
        """Metadata value ``key``, or a UserError naming it."""
        if key not in self.meta:
            raise UserError(f"{self.path}: metadata key {key} is missing; is it a complete "
                            "GGUF file?")
        return self.meta[key]

    def tensor(self, name: str) -> Tensor:
        """Tensor ``name`` dequantized to float32, in our (out, in) layout."""
        gguf = _gguf()
        info = self.tensors[name]
        try:
            data = gguf.quants.dequantize(info.data, info.tensor_type)
        except NotImplementedError:
            raise UserError(f"{self.path}: tensor {name} is {info.tensor_type.name}, which the "
                            "gguf package cannot dequantize; convert the file to F16, Q8_0 or "
                            "Q4_0 with llama.cpp's llama-quantize") from None
        shape = tuple(int(d) for d in reversed(info.shape))  # GGUF lists ne0 (the row) first
        # np.array copies: an F32 tensor is a read-only view of the memory-mapped file.
        return torch.from_numpy(np.array(data, dtype=np.float32).reshape(shape))

    def kept_metadata(self) -> dict[str, Any]:
        """The source's own metadata a re-export writes back: name, license, languages, ...,
        and the special-token ids beyond BOS/EOS (unknown, padding, ...)."""
        return {k: _plain(v) for k, v in self.meta.items()
                if (k.startswith("general.") and k not in _OWN_GENERAL) or k in _KEPT_IDS}


def _rope_scaling(f: GGUFFile, arch: str, head_dim: int, theta: float) -> RopeScaling:
    """linear from the metadata, Llama 3.1's from a rope_freqs tensor, else none."""
    kind = f.meta.get(f"{arch}.rope.scaling.type", "none")
    if kind == "linear":
        return RopeScaling(type="linear", factor=float(f.need(f"{arch}.rope.scaling.factor")))
    if kind not in ("none", None):
        raise UserError(f"{f.path}: {arch}.rope.scaling.type = {kind!r} is not supported "
                        "(lmforge reads linear, and Llama 3.1's rope_freqs)")
    if ROPE_FREQS not in f.tensors:
        return RopeScaling()
    original = int(f.meta.get(f"{arch}.rope.scaling.original_context_length", 8192))
    return fit_llama3(f.tensor(ROPE_FREQS).double(), head_dim, theta, original, str(f.path))


def fit_llama3(factors: Tensor, head_dim: int, theta: float, original: int,
               where: str) -> RopeScaling:
    """The Llama 3.1 rope_scaling whose rope_freqs are ``factors`` (UserError if none is).

    In the blend band 1/f = 1/factor + s (1 - 1/factor) with s linear in original/wavelength:
    s = (original/wavelength - low) / (high - low), so two blended pairs give low and high.
    Only the ratios original/low and original/high matter, so ``original`` may be any value.
    """
    factor = float(factors.max())
    x = original * (1.0 / theta ** (torch.arange(0, head_dim, 2).double() / head_dim)) / (
        2 * math.pi)  # original / wavelength, rising with the pair index
    blended = (factors > 1 + 1e-6) & (factors < factor - 1e-6)
    s = (1 / factors - 1 / factor) / (1 - 1 / factor)
    if int(blended.sum()) >= 2:
        a, b = np.polyfit(x[blended].numpy(), s[blended].numpy(), 1)
        low, high = -b / a, (1 - b) / a
    else:  # too few blended pairs to fit: any edges between the bands give the same table
        kept, divided = x[factors <= 1 + 1e-6], x[factors >= factor - 1e-6]
        low = float(divided.max()) * 1.0001 if len(divided) else float(x.min()) / 2
        high = float(kept.min()) * 0.9999 if len(kept) else float(x.max()) * 2
        if int(blended.sum()) == 1:  # keep high, move low so that the one pair blends right
            x1, s1 = float(x[blended][0]), float(s[blended][0])
            high = (x1 + high) / 2
            low = (x1 - s1 * high) / (1 - s1)
    try:
        rs = RopeScaling(type="llama3", factor=factor, original_block_size=original,
                         low_freq_factor=float(low), high_freq_factor=float(high))
    except ConfigError:
        rs = None
    if rs is None or not torch.allclose(_llama3_factors(DecoderConfig(
            vocab_size=1, n_head=1, n_embd=head_dim, rope_theta=theta, rope_scaling=rs)).double(),
            factors, rtol=1e-4):
        raise UserError(f"{where}: tensor {ROPE_FREQS} does not follow Llama 3.1's rope "
                        "scaling, the only frequency table lmforge reads")
    return rs


def decoder_config_from_gguf(f: GGUFFile) -> DecoderConfig:
    """Our config for a GGUF of one of ARCHS: shape from the metadata, the rest from which
    tensors the file has (biases, q/k norms, a separate head) and the arch (Gemma's fields)."""
    arch = f.arch
    value = f.meta.get(f"{arch}.expert_count")
    if value not in (None, 0):
        raise UserError(f"{f.path}: {arch}.expert_count = {value!r} is not supported (lmforge "
                        "implements dense models)")
    if "token_embd.weight" not in f.tensors:
        raise UserError(f"{f.path}: tensor token_embd.weight is missing")
    width = int(f.need(f"{arch}.embedding_length"))
    heads = int(f.need(f"{arch}.attention.head_count"))
    kv = int(f.meta.get(f"{arch}.attention.head_count_kv", heads))
    common = dict(
        vocab_size=int(f.tensors["token_embd.weight"].shape[1]),
        block_size=int(f.need(f"{arch}.context_length")),
        n_layer=int(f.need(f"{arch}.block_count")), n_head=heads,
        n_kv_head=None if kv == heads else kv, n_embd=width,
        intermediate_size=int(f.need(f"{arch}.feed_forward_length")),
        tie_embeddings="output.weight" not in f.tensors, dropout=0.0)
    try:
        if arch == "gpt2":
            return DecoderConfig(
                **common, norm="layernorm", pos="learned", mlp="gelu", bias=True,
                norm_eps=float(f.meta.get("gpt2.attention.layer_norm_epsilon", 1e-5)))
        head_dim = int(f.meta.get(f"{arch}.attention.key_length", width // heads))
        for key in (f"{arch}.rope.dimension_count", f"{arch}.attention.value_length"):
            if key in f.meta and int(f.meta[key]) != head_dim:
                raise UserError(f"{f.path}: {key} = {f.meta[key]} but lmforge needs it equal "
                                f"to the head width {head_dim} (partial rotary is unsupported)")
        theta = float(f.meta.get(f"{arch}.rope.freq_base", 10000.0))
        scaling = _rope_scaling(f, arch, head_dim, theta)
        rope = dict(pos="rope", rope_theta=theta, rope_scaling=scaling,
                    norm_eps=float(f.meta.get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
                    head_size=None if head_dim * heads == width else head_dim)
        if arch in GEMMA_EVERY:
            scalar = gemma_attention_scalar(arch, common["n_layer"], width, heads, head_dim)
            gemma = _gemma_fields(f, arch, scalar, scaling.type != "none")
            return DecoderConfig(**common, **rope, **gemma)
        return DecoderConfig(**common, **rope, norm="rmsnorm", mlp="swiglu",
                             qkv_bias="blk.0.attn_q.bias" in f.tensors, qk_norm=arch == "qwen3")
    except ConfigError as e:
        raise UserError(f"{f.path}: {e}") from None


def _gemma_fields(f: GGUFFile, arch: str, scalar: int, scaled: bool) -> dict[str, Any]:
    """Our Gemma fields for a gemma2/gemma3 file, read as llama.cpp's graph reads its keys."""
    m, n_layer = f.meta, int(f.need(f"{arch}.block_count"))
    if arch == "gemma2" and "output.weight" in f.tensors:
        raise UserError(f"{f.path}: tensor output.weight is not used by llama.cpp's gemma2 "
                        "(its head is token_embd); an unsupported variant")
    pattern = m.get(f"{arch}.attention.sliding_window_pattern", GEMMA_EVERY[arch])
    if isinstance(pattern, int):
        pattern = gemma_pattern(pattern, n_layer)
    elif len(pattern) != n_layer:
        raise UserError(f"{f.path}: {arch}.attention.sliding_window_pattern has {len(pattern)} "
                        f"entries for {n_layer} layers")
    window = m.get(f"{arch}.attention.sliding_window")
    if arch == "gemma2" and window is None:
        window = GEMMA2_WINDOW
    local = [i for i, slides in enumerate(pattern) if slides] if window else []
    theta = float(m.get(f"{arch}.rope.freq_base", 10000.0))
    # The sliding layers' RoPE: gemma3's has base freq_base_swa (default 10000) and no scaling,
    # as our rope_local_theta; gemma2's defaults to the global one, scaling included.
    local_theta = float(m.get(f"{arch}.rope.freq_base_swa", 10000.0 if arch == "gemma3" else theta))
    if arch == "gemma2" and local_theta != theta and scaled:
        raise UserError(f"{f.path}: {arch}.rope.freq_base_swa with rope scaling is not supported "
                        "(lmforge's local RoPE has its own base and no scaling)")
    caps = GEMMA2_CAPS if arch == "gemma2" else (None, None)
    final = m.get(f"{arch}.final_logit_softcapping", caps[1])
    return dict(
        norm="rmsnorm1p", mlp="geglu", embed_scale=True, sandwich_norm=True,
        qk_norm=arch == "gemma3", query_pre_attn_scalar=scalar,
        attn_softcap=None if arch == "gemma3" else float(
            m.get(f"{arch}.attn_logit_softcapping", caps[0])),
        logit_softcap=float(final) if final else None,  # gemma3: absent or 0 = no cap
        sliding_window=int(window) if local else None, local_layers=local or None,
        rope_local_theta=local_theta if local and (arch == "gemma3" or local_theta != theta)
        else None)


def load_gguf_model(f: GGUFFile, dtype: torch.dtype = torch.float32) -> Decoder:
    """Our model holding the (dequantized, unpermuted, split) weights of ``f``, in eval mode."""
    cfg = decoder_config_from_gguf(f)
    arch = f.arch
    with torch.device("meta"):
        model = Decoder(cfg)
    model.to_empty(device="cpu")  # every tensor is overwritten below: skip the random init
    model.to(dtype)
    state = model.state_dict()
    groups: dict[str, list[str]] = {}  # llama.cpp name -> our keys (q, k, v for attn_qkv)
    for ours in state:
        if not (ours == "lm_head.weight" and cfg.tie_embeddings):
            groups.setdefault(gguf_name(ours, arch), []).append(ours)
    for name, keys in groups.items():
        if name not in f.tensors:
            raise UserError(f"{f.path}: tensor {name} is missing; is it a complete {arch} "
                            "file?")
        w = f.tensor(name)
        rows = [state[k].shape[0] for k in keys]
        want = (sum(rows), *state[keys[0]].shape[1:])
        if tuple(w.shape) != want:
            raise UserError(f"{f.path}: tensor {name} has shape {tuple(w.shape)} but the "
                            f"metadata implies {want}")
        for key, part in zip(keys, w.split(rows), strict=True):
            heads = _heads_of(key, cfg, arch)
            offset = norm_offset(model, key)
            if offset:
                part = part - offset
            with torch.no_grad():
                state[key].copy_(unpermute_qk(part, heads) if heads else part)
    extra = sorted(set(f.tensors) - set(groups) - {ROPE_FREQS})
    if extra:  # e.g. biases where llama has none
        raise UserError(f"{f.path}: tensor {extra[0]} is not used by lmforge's {arch} "
                        "(an unsupported variant)")
    return model.eval()


def special_ids(f: GGUFFile) -> tuple[int | None, int | None]:
    """(BOS id, EOS id) from the tokenizer metadata."""
    bos, eos = (f.meta.get(f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos"))
    return (None if bos is None else int(bos)), (None if eos is None else int(eos))


def stop_ids(f: GGUFFile) -> list[int]:
    """Every id that ends a text: EOS, then end-of-turn and end-of-message (Llama 3's
    <|eot_id|>, <|eom_id|>), as llama.cpp stops at each."""
    keys = ("eos", "eot", "eom")
    ids = (f.meta.get(f"tokenizer.ggml.{k}_token_id") for k in keys)
    return list(dict.fromkeys(int(i) for i in ids if i is not None))


def chat_template(f: GGUFFile) -> str | None:
    """The Jinja chat template stored in the file, if any."""
    value = f.meta.get("tokenizer.chat_template")
    return value if isinstance(value, str) and value.strip() else None


# --------------------------------------------------------------------------- tokenizer


def _pre_tokenizer(name: str, where: str) -> Any:
    """The ``tokenizers`` pre-tokenizer for a llama.cpp ``tokenizer.ggml.pre`` name."""
    from tokenizers import Regex
    from tokenizers import pre_tokenizers as pt

    if name in ("gpt-2", "gpt2", "default"):
        return pt.ByteLevel(add_prefix_space=False, use_regex=True)  # GPT-2's regex
    if name == "smollm":  # llama.cpp: "\p{N}" (each digit alone), then GPT-2's regex
        return pt.Sequence([pt.Digits(individual_digits=True),
                            pt.ByteLevel(add_prefix_space=False, use_regex=True)])
    if name in _SPLITS:  # as Llama 3's and Qwen2's tokenizer.json: split, then bytes only
        return pt.Sequence([pt.Split(Regex(_SPLITS[name]), behavior="isolated"),
                            pt.ByteLevel(add_prefix_space=False, use_regex=False)])
    raise UserError(f"{where}: tokenizer.ggml.pre = {name!r} is not supported; lmforge rebuilds "
                    f"gpt-2, smollm, {', '.join(_SPLITS)}")


def pre_tokenizer_name(tokenizer_json: dict[str, Any]) -> str | None:
    """The llama.cpp pre-tokenizer whose split rule a tokenizer.json's is, or None."""
    pre = tokenizer_json.get("pre_tokenizer") or {}

    def byte_level(p: dict[str, Any], regex: bool = True) -> bool:
        return (p.get("type") == "ByteLevel" and not p.get("add_prefix_space")
                and bool(p.get("use_regex", True)) == regex)

    if byte_level(pre):
        return "gpt-2"
    parts = pre.get("pretokenizers") or []
    if pre.get("type") != "Sequence" or len(parts) != 2:
        return None
    if byte_level(parts[1]) and parts[0] == {"type": "Digits", "individual_digits": True}:
        return "smollm"
    split = parts[0]
    if (byte_level(parts[1], regex=False) and split.get("type") == "Split"
            and split.get("behavior") == "Isolated" and not split.get("invert")):
        regex = (split.get("pattern") or {}).get("Regex")
        return next((name for name, r in _SPLITS.items() if r == regex), None)
    return None


def check_hash(tok: Any) -> str:
    """convert_hf_to_gguf.py's identifier of a tokenizer: sha256 of the ids of CHECK_TEXT."""
    return sha256(str(tok.encode(CHECK_TEXT).ids).encode()).hexdigest()


def choose_pre(tok: Any, tokenizer_json: dict[str, Any]) -> str | None:
    """tokenizer.ggml.pre for a tokenizer: by its check hash, as llama.cpp's converter does,
    else (a tokenizer trained here, unknown to that table) by its pre-tokenizer's structure."""
    return KNOWN_HASHES.get(check_hash(tok)) or pre_tokenizer_name(tokenizer_json)


def gguf_tokenizer(f: GGUFFile) -> Any:
    """A ``tokenizers`` byte-level BPE with the file's vocabulary, merges and special tokens."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, processors

    kind = f.meta.get("tokenizer.ggml.model")
    if kind == "llama":
        return _spm_tokenizer(f)
    if kind != "gpt2":
        raise UserError(f"{f.path}: tokenizer.ggml.model is {kind!r}; lmforge rebuilds byte-level "
                        "BPE ('gpt2') and SentencePiece-style ('llama') vocabularies")
    tokens = list(f.need("tokenizer.ggml.tokens"))
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise UserError(f"{f.path}: tokenizer.ggml.tokens has duplicate entries")
    merges = [tuple(m.split(" ", 1)) for m in f.meta.get("tokenizer.ggml.merges", [])]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = _pre_tokenizer(f.meta.get("tokenizer.ggml.pre", "gpt-2"), str(f.path))
    tok.decoder = decoders.ByteLevel()
    types = list(f.meta.get("tokenizer.ggml.token_type", []))
    # Control tokens (<|im_start|>, <|endoftext|>) are special: matched whole in text, never
    # split by BPE, skipped when decoding with skip_special_tokens; user-defined ones are
    # matched whole but decoded as text.
    added = [AddedToken(tokens[i], special=t == CONTROL, normalized=False)
             for i, t in enumerate(types) if t in (CONTROL, USER_DEFINED)]
    tok.add_tokens([a for a in added if not a.special])
    tok.add_special_tokens([a for a in added if a.special])
    bos, _ = special_ids(f)
    if f.meta.get("tokenizer.ggml.add_bos_token") and bos is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{tokens[bos]} $A", special_tokens=[(tokens[bos], bos)])
    return tok


def _spm_tokenizer(f: GGUFFile) -> Any:
    """A SentencePiece-style ('llama') vocabulary as transformers' GGUF loader rebuilds it
    (merges from the scores, byte fallback, "▁" for spaces), with the file's add_bos_token."""
    from tokenizers import decoders, normalizers, processors

    try:
        from transformers.integrations.gguf import convert_gguf_tokenizer, get_gguf_tokenizer
    except ImportError:
        raise UserError(f"{f.path}: rebuilding a SentencePiece-style ('llama') GGUF vocabulary "
                        "needs transformers' GGUF tokenizer converter (transformers 5, tested "
                        "with 5.24); pip install -U transformers") from None
    try:
        arch, tokenizer_dict, _ = get_gguf_tokenizer(str(f.path))
        tok, _ = convert_gguf_tokenizer(arch, tokenizer_dict)
    except (KeyError, ValueError) as e:
        raise UserError(f"{f.path}: transformers cannot rebuild its 'llama' vocabulary "
                        f"({type(e).__name__}: {e})") from None
    # Spaces as llama.cpp's SPM tokenizer reads them (transformers' phi3 builder does the
    # same): every space "▁", and with add_space_prefix (its default) one more "▁" before each
    # text and after each special token, even a text that starts with a space (where a
    # Metaspace pre-tokenizer adds none).
    prefix = bool(f.meta.get("tokenizer.ggml.add_space_prefix", True))
    replace = normalizers.Replace(" ", "\u2581")
    tok.normalizer = (normalizers.Sequence([normalizers.Prepend("\u2581"), replace]) if prefix
                      else replace)
    tok.pre_tokenizer = None
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), *([decoders.Strip(" ", 1, 0)] * prefix)])
    bos, _ = special_ids(f)
    tokens = tokenizer_dict["tokens"]
    if f.meta.get("tokenizer.ggml.add_bos_token", True) and bos is not None:  # llama.cpp's
        tok.post_processor = processors.TemplateProcessing(  # default for 'llama': add BOS
            single=f"{tokens[bos]} $A", special_tokens=[(tokens[bos], bos)])
    else:
        tok.post_processor = processors.TemplateProcessing(single="$A")
    return tok


@dataclass
class Vocab:
    """A tokenizer.json as GGUF's tokenizer.ggml.* keys hold it."""

    tokens: list[str]
    types: list[int]
    merges: list[str]
    pre: str
    add_bos: bool
    model: str = "gpt2"
    """tokenizer.ggml.model: "gpt2" (byte-level BPE) or "llama" (SentencePiece-style)."""
    scores: list[float] | None = None
    """SentencePiece-style only: each token's merge priority (higher merges first)."""
    add_space_prefix: bool | None = None
    unk_id: int | None = None


def spm_space_prefix(tokenizer_json: dict[str, Any]) -> bool | None:
    """For a SentencePiece-style tokenizer.json (Llama 2, Mistral, Phi-3: a byte-fallback BPE
    over text whose spaces are "▁"), whether a "▁" is put before the text; None for others.

    Three spellings exist: a Metaspace pre-tokenizer that does not split (transformers' current
    Llama tokenizer), or a Prepend("▁") + Replace(" ", "▁") normalizer and no pre-tokenizer
    (the legacy one, Phi-3's), or Replace(" ", "▁") alone (Gemma's: no "▁" before the text);
    llama.cpp's SPM tokenizer works as they do.
    """
    model = tokenizer_json.get("model") or {}
    if model.get("type") != "BPE" or not model.get("byte_fallback"):
        return None
    pre, norm = tokenizer_json.get("pre_tokenizer"), tokenizer_json.get("normalizer")
    if (norm is None and pre and pre.get("type") == "Metaspace" and not pre.get("split")
            and pre.get("replacement") == "\u2581"):
        return pre.get("prepend_scheme", "always") != "never"
    parts = (norm or {}).get("normalizers") or ([norm] if norm else [])
    if pre is None and parts and all(p.get("type") in ("Prepend", "Replace") for p in parts):
        replace = [p for p in parts if p.get("type") == "Replace"]
        if replace == [{"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}]:
            return {"type": "Prepend", "prepend": "\u2581"} in parts
    return None


def merge_scores(tokens: list[str], merges: list[Any]) -> list[float]:
    """SentencePiece scores that replay a BPE's merge order: the token made by merge r scores
    -r (its first merge), every other token 0.

    llama.cpp's SPM tokenizer (and transformers' GGUF reader, which rebuilds merges from the
    scores) merges the adjacent pair whose joined token scores highest, so ranks make it merge
    in the tokenizer.json's order. llama.cpp's converter writes -1000 for every token here
    (gguf.LlamaHfVocab, a placeholder), which merges left to right instead.
    """
    rank: dict[str, int] = {}
    for r, m in enumerate(merges):
        rank.setdefault("".join(m.split(" ", 1) if isinstance(m, str) else m), r)
    return [-float(rank[t]) if t in rank else 0.0 for t in tokens]


def _gguf_vocab(tokenizer_path: Path, vocab_size: int) -> Vocab:
    """The GGUF vocabulary of a tokenizer.json, one entry per embedding row."""
    from tokenizers import Tokenizer

    data = json.loads(tokenizer_path.read_text(encoding="utf-8"))
    tok = Tokenizer.from_file(str(tokenizer_path))
    space_prefix = spm_space_prefix(data)
    pre = "default" if space_prefix is not None else choose_pre(tok, data)
    kind, why = data.get("model", {}).get("type"), None
    if kind != "BPE":
        why = f"a {kind} model, where GGUF export writes byte-level BPE"
    elif space_prefix is None and (data.get("normalizer")
                                   or "Metaspace" in json.dumps(data.get("pre_tokenizer"))):
        why = ("a SentencePiece-style BPE other than Llama 2's (a byte-fallback BPE with a "
               "non-splitting Metaspace, or a Prepend/Replace normalizer)")
    elif pre is None:
        why = ("a pre-tokenizer that is none of llama.cpp's gpt-2, smollm, llama-bpe, qwen2 "
               "split rules")
    if why:
        raise UserError(f"{tokenizer_path}: the tokenizer is {why}; export this run with "
                        "--format hf or onnx")
    # Rows of the embedding that no token uses get placeholder names, as llama.cpp does.
    tokens, types = [f"[PAD{i}]" for i in range(vocab_size)], [UNUSED] * vocab_size
    for text, i in tok.get_vocab(with_added_tokens=True).items():
        if i >= vocab_size:
            raise UserError(f"{tokenizer_path}: token {text!r} has id {i} but the model has only "
                            f"{vocab_size} embedding rows; wrong tokenizer?")
        tokens[i], types[i] = text, NORMAL
    for i, added in tok.get_added_tokens_decoder().items():
        types[i] = CONTROL if added.special else USER_DEFINED
    if space_prefix is not None:  # as gguf.LlamaHfVocab: byte-fallback pieces <0x00>..<0xFF>
        types = [BYTE if BYTE_TOKEN.fullmatch(t) else k for t, k in zip(tokens, types)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"].get("merges", [])]
    # A BOS-prepending post-processor (what gguf_tokenizer builds from add_bos_token) -> true.
    post = data.get("post_processor") or {}
    first = (post.get("single") or [{}])[0] if post.get("type") == "TemplateProcessing" else {}
    add_bos = "SpecialToken" in first
    if space_prefix is None:
        return Vocab(tokens, types, merges, pre, add_bos)
    unk = data["model"].get("unk_token")
    return Vocab(tokens, types, [], pre, add_bos, "llama", merge_scores(tokens, merges),
                 space_prefix, tok.token_to_id(unk) if unk else None)


# --------------------------------------------------------------------------- writing


@dataclass
class GGUFMeta:
    """What a GGUF file says besides the weights."""

    name: str
    tokenizer: Path
    bos_id: int | None
    eos_id: int | None
    chat_template: str | None = None
    kept: dict[str, Any] = field(default_factory=dict)
    """The source's metadata (GGUFFile.kept_metadata of an imported file): written back as
    it was, its general.name replacing ``name``."""


def _add_kept(w: Any, kept: dict[str, Any]) -> None:
    """Write back kept metadata: strings, booleans, token ids (uint32), floats, string lists."""
    gguf = _gguf()
    vt = gguf.GGUFValueType
    for key, value in kept.items():
        if key == "general.name":
            continue  # written by add_name
        if isinstance(value, bool):
            w.add_bool(key, value)
        elif isinstance(value, int):
            w.add_uint32(key, value)
        elif isinstance(value, float):
            w.add_float32(key, value)
        elif isinstance(value, str):
            w.add_string(key, value)
        elif isinstance(value, list) and all(isinstance(v, str) for v in value):
            w.add_key_value(key, value, vt.ARRAY, sub_type=vt.STRING)


def _metadata(w: Any, cfg: DecoderConfig, arch: str, meta: GGUFMeta, file_type: int) -> None:
    """The llama.cpp architecture and tokenizer keys, on GGUFWriter ``w``."""
    gguf = _gguf()
    w.add_type("model")
    w.add_name(str(meta.kept.get("general.name", meta.name)))
    w.add_file_type(file_type)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_context_length(cfg.block_size)
    w.add_embedding_length(cfg.n_embd)
    w.add_block_count(cfg.n_layer)
    w.add_feed_forward_length(cfg.ffn_dim)
    w.add_head_count(cfg.n_head)
    if arch == "gpt2":
        w.add_layer_norm_eps(cfg.norm_eps)
    else:
        w.add_head_count_kv(cfg.kv_heads)
        w.add_rope_freq_base(cfg.rope_theta)
        w.add_rope_dimension_count(cfg.head_dim)
        w.add_layer_norm_rms_eps(cfg.norm_eps)
        if cfg.head_size is not None or arch in GEMMA_EVERY:  # the converter writes Gemma's
            w.add_key_length(cfg.head_dim)
            w.add_value_length(cfg.head_dim)
        rs = cfg.rope_scaling
        if rs.type == "linear":
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(rs.factor)
        elif rs.type == "llama3":  # the table is the rope_freqs tensor; this says its base
            w.add_rope_scaling_orig_ctx_len(rs.original_block_size or cfg.block_size)
    if arch in GEMMA_EVERY:
        _gemma_metadata(w, cfg, arch)
    w.add_vocab_size(cfg.vocab_size)
    vocab = _gguf_vocab(meta.tokenizer, cfg.vocab_size)
    w.add_tokenizer_model(vocab.model)
    w.add_tokenizer_pre(vocab.pre)
    w.add_token_list(vocab.tokens)
    if vocab.scores is not None:
        w.add_token_scores(vocab.scores)
    w.add_token_types(vocab.types)
    if vocab.model == "gpt2":
        w.add_token_merges(vocab.merges)
    if vocab.add_space_prefix is not None:
        w.add_add_space_prefix(vocab.add_space_prefix)
    if vocab.unk_id is not None and "tokenizer.ggml.unknown_token_id" not in meta.kept:
        w.add_unk_token_id(vocab.unk_id)
    # A run trained by lmforge has no BOS: its documents follow <|endoftext|>, which llama.cpp
    # also accepts as BOS (GPT-2's convention); nothing is prepended either way.
    bos = meta.bos_id if meta.bos_id is not None else meta.eos_id
    if bos is not None:
        w.add_bos_token_id(bos)
    if meta.eos_id is not None:
        w.add_eos_token_id(meta.eos_id)
    w.add_add_bos_token(vocab.add_bos)
    if meta.chat_template:
        w.add_chat_template(meta.chat_template)
    _add_kept(w, {k: v for k, v in meta.kept.items() if k.startswith("general.")
                  or (isinstance(v, int) and 0 <= v < cfg.vocab_size)})


def _gemma_metadata(w: Any, cfg: DecoderConfig, arch: str) -> None:
    """Soft caps, the sliding window, which layers slide and their RoPE base."""
    if cfg.attn_softcap is not None:
        w.add_attn_logit_softcapping(cfg.attn_softcap)
    if cfg.logit_softcap is not None:
        w.add_final_logit_softcapping(cfg.logit_softcap)
    pattern = [cfg.window(i) is not None for i in range(cfg.n_layer)]
    if not any(pattern):  # gemma3 only (gemma2 refuses it): llama.cpp's graph without SWA
        return
    w.add_sliding_window(cfg.sliding_window)
    if pattern != gemma_pattern(GEMMA_EVERY[arch], cfg.n_layer):  # as convert_hf_to_gguf.py
        w.add_sliding_window_pattern(pattern)  # writes a layer_types list (Cohere2, Exaone4)
    w.add_rope_freq_base_swa(cfg.rope_local_theta or cfg.rope_theta)


def _encode(t: Tensor, ggml_type: str) -> tuple[np.ndarray, Any]:
    """(array to write, raw GGML type) for one tensor in ``ggml_type``.

    Block types need rows that are a whole number of 32-value blocks; a tensor whose rows are
    not falls back to F16, as llama.cpp's converter does.
    """
    gguf = _gguf()
    qtype = gguf.GGMLQuantizationType[ggml_type]
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if t.ndim == 1 or ggml_type == "F32":  # norms and biases stay F32, as llama.cpp keeps 1-D
        return t.float().numpy(), None
    if ggml_type == "F16" or t.shape[-1] % block:
        return t.half().numpy(), None
    return gguf.quants.quantize(t.float().numpy(), qtype), qtype


def write_gguf(model: Decoder, path: Path, gguf_type: str, meta: GGUFMeta) -> Counter[str]:
    """Write ``model`` as a llama.cpp GGUF of its architecture; the count of each tensor type."""
    gguf = _gguf()
    cfg = model.cfg
    arch = gguf_arch(cfg)
    matrix_type, edge_type, file_type = TYPES[gguf_type]
    w = gguf.GGUFWriter(str(path), arch)
    _metadata(w, cfg, arch, meta, gguf.LlamaFileType[file_type])
    written: Counter[str] = Counter()
    for name, t in gguf_tensors(model, arch).items():
        edge = name in ("token_embd.weight", "output.weight")
        data, raw = _encode(t, edge_type if edge else matrix_type)
        w.add_tensor(name, data, raw_dtype=raw)
        written[raw.name if raw is not None else ("F32" if data.dtype == np.float32 else "F16")] += 1
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return written


def check_ids(vocab_size: int, length: int) -> Tensor:
    """Fixed pseudo-random token ids (2, length): the input every load-back check runs."""
    return torch.randint(0, vocab_size, (2, length), generator=torch.Generator().manual_seed(0))


@dataclass
class Check:
    """A load-back check: the file as read back, and how far its logits are from ours."""

    file: GGUFFile
    max_diff: float
    """max |Δlogits| against the fp32 model."""
    top1: float
    """Share of positions whose most likely next token is the same in both."""


@torch.no_grad()
def load_back_check(model: Decoder, path: Path) -> Check:
    """Read ``path`` back with gguf's reader and our importer; compare with ``model`` (fp32).

    The input is random token ids: a worst case for quantized types (real text agrees more),
    which makes the max |Δlogits| a conservative number.
    """
    f = GGUFFile.open(path)
    back = load_gguf_model(f)
    idx = check_ids(model.cfg.vocab_size, min(model.cfg.block_size, 64))
    ours, theirs = model.float().eval()(idx), back(idx)
    top1 = (ours.argmax(-1) == theirs.argmax(-1)).float().mean().item()
    return Check(f, (ours - theirs).abs().max().item(), top1)


def tokenizer_round_trip(f: GGUFFile, tokenizer_path: Path, text: str) -> str | None:
    """None when the file's rebuilt tokenizer encodes ``text`` as the run's does, else why."""
    from tokenizers import Tokenizer

    ours = Tokenizer.from_file(str(tokenizer_path)).encode(text).ids
    theirs = gguf_tokenizer(f).encode(text).ids
    if ours == theirs:
        return None
    at = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours),
                                                                              len(theirs)))
    return f"token {at}: {ours[at:at + 3]} in the run, {theirs[at:at + 3]} in the GGUF"

"""GGUF files (llama.cpp's format) in and out, for Llama-style decoders.

A GGUF file is one binary holding metadata (key/value pairs: the architecture's shape, the
tokenizer's vocabulary and merges, the chat template) and named tensors, each in its own type
(F32, F16, BF16, or a block-quantized type such as Q8_0, Q4_0, Q4_1). We follow the names and
keys of llama.cpp's ``convert_hf_to_gguf.py`` for its ``llama`` architecture:

==========================  =====================================================
ours                        GGUF
==========================  =====================================================
tok_emb.weight              token_embd.weight
blocks.N.attn_norm          blk.N.attn_norm
blocks.N.attn.{q,k,v,o}     blk.N.attn_q / attn_k / attn_v / attn_output (q, k permuted)
blocks.N.mlp_norm           blk.N.ffn_norm
blocks.N.mlp.{gate,up,down} blk.N.ffn_gate / ffn_up / ffn_down
norm_f.weight               output_norm.weight
lm_head.weight              output.weight (absent when tied to token_embd)
==========================  =====================================================

The permutation: our RoPE rotates the two halves of each head (HF's ``rotate_half``), while
llama.cpp's ``llama`` rope rotates adjacent pairs (x[2i], x[2i+1]). The converter therefore
reorders the rows of q and k within each head so that pair i holds our rows i and i + D/2;
writing applies that order and reading undoes it. Everything else is stored as is: a GGUF
tensor of shape [ne0, ne1] is our (out, in) = (ne1, ne0) matrix, row-major.

The ``gguf`` package (llama.cpp's own Python reader/writer) is imported only inside functions
of this module, so lmforge works without it until a GGUF is read or written.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lmforge.config import ConfigError, UserError
from lmforge.models.decoder import Decoder, DecoderConfig

MAGIC = b"GGUF"
ARCH = "llama"
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
_TOP = {"tok_emb.weight": "token_embd.weight", "norm_f.weight": "output_norm.weight",
        "lm_head.weight": "output.weight"}
_IN_BLOCK = {
    "attn_norm.weight": "attn_norm.weight", "attn.q_proj.weight": "attn_q.weight",
    "attn.k_proj.weight": "attn_k.weight", "attn.v_proj.weight": "attn_v.weight",
    "attn.o_proj.weight": "attn_output.weight", "mlp_norm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
# tokenizer.ggml.token_type values (llama.cpp's llama_token_type)
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5


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


def gguf_name(ours: str) -> str:
    """The llama.cpp name of one of our state-dict keys (``blocks.3.attn.q_proj.weight``)."""
    if ours in _TOP:
        return _TOP[ours]
    _, layer, rest = ours.split(".", 2)
    return f"blk.{layer}.{_IN_BLOCK[rest]}"


def permute_qk(w: Tensor, n_head: int) -> Tensor:
    """Our rotate-half row order of q or k (n_head*D, C) -> llama.cpp's interleaved pairs."""
    rows, *rest = w.shape
    # (H, 2, D/2, C): half, then index in half -> (H, D/2, 2, C): pair index, then half
    return w.reshape(n_head, 2, rows // n_head // 2, *rest).transpose(1, 2).reshape(w.shape)


def unpermute_qk(w: Tensor, n_head: int) -> Tensor:
    """Inverse of ``permute_qk``: llama.cpp's q/k rows back into our rotate-half order."""
    rows, *rest = w.shape
    return w.reshape(n_head, rows // n_head // 2, 2, *rest).transpose(1, 2).reshape(w.shape)


def _heads_of(ours: str, cfg: DecoderConfig) -> int | None:
    """Heads to (un)permute a tensor by: n_head for q, the KV heads for k, None otherwise."""
    if ours.endswith("attn.q_proj.weight"):
        return cfg.n_head
    if ours.endswith("attn.k_proj.weight"):
        return cfg.kv_heads
    return None


def check_exportable(cfg: DecoderConfig) -> None:
    """UserError naming the field when llama.cpp's ``llama`` architecture cannot hold ``cfg``."""
    style = (cfg.pos, cfg.norm, cfg.mlp)
    if style != ("rope", "rmsnorm", "swiglu"):
        raise UserError(
            f"model.pos/norm/mlp: {'/'.join(style)} cannot be written as GGUF; lmforge writes "
            "the llama architecture (rope/rmsnorm/swiglu); export GPT-2 style runs with --format "
            "hf or onnx")
    for name, bad in (("bias", cfg.bias), ("qkv_bias", cfg.qkv_bias),
                      ("sliding_window", cfg.sliding_window is not None)):
        if bad:
            raise UserError(f"model.{name}: GGUF export writes llama.cpp's llama architecture, "
                            f"which has no {name}; export with --format hf or onnx instead")
    for name, bad in (("head_size", cfg.head_size is not None), ("qk_norm", cfg.qk_norm),
                      ("rope_scaling", cfg.rope_scaling.type != "none")):
        if bad:
            raise UserError(f"model.{name}: lmforge's GGUF export does not write {name} yet; "
                            "export with --format hf or onnx instead")


# --------------------------------------------------------------------------- reading


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

    def need(self, key: str) -> Any:
        """Metadata value ``key``, or a UserError naming it."""
        if key not in self.meta:
            raise UserError(f"{self.path}: metadata key {key} is missing; is it a complete "
                            f"{ARCH} GGUF file?")
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


def decoder_config_from_gguf(f: GGUFFile) -> DecoderConfig:
    """Our config for a ``llama`` GGUF: shape from the metadata, vocab and tying from tensors."""
    arch = f.meta.get("general.architecture")
    if arch != ARCH:
        raise UserError(f"{f.path}: general.architecture is {arch!r}; lmforge reads the "
                        f"{ARCH!r} architecture (Llama, SmolLM, Mistral-style without a window)")
    for key in (f"{ARCH}.expert_count", f"{ARCH}.rope.scaling.type"):
        value = f.meta.get(key)
        if value not in (None, 0, "none"):
            raise UserError(f"{f.path}: {key} = {value!r} is not supported (lmforge implements "
                            "dense models with plain RoPE)")
    if "token_embd.weight" not in f.tensors:
        raise UserError(f"{f.path}: tensor token_embd.weight is missing")
    width = int(f.need(f"{ARCH}.embedding_length"))
    heads = int(f.need(f"{ARCH}.attention.head_count"))
    kv = int(f.meta.get(f"{ARCH}.attention.head_count_kv", heads))
    head_dim = width // heads
    for key in (f"{ARCH}.rope.dimension_count", f"{ARCH}.attention.key_length"):
        if key in f.meta and int(f.meta[key]) != head_dim:
            raise UserError(f"{f.path}: {key} = {f.meta[key]} but lmforge needs it equal to "
                            f"embedding_length / head_count = {head_dim}")
    try:
        return DecoderConfig(
            vocab_size=int(f.tensors["token_embd.weight"].shape[1]),
            block_size=int(f.need(f"{ARCH}.context_length")),
            n_layer=int(f.need(f"{ARCH}.block_count")), n_head=heads,
            n_kv_head=None if kv == heads else kv, n_embd=width,
            intermediate_size=int(f.need(f"{ARCH}.feed_forward_length")), norm="rmsnorm",
            norm_eps=float(f.meta.get(f"{ARCH}.attention.layer_norm_rms_epsilon", 1e-5)),
            pos="rope", rope_theta=float(f.meta.get(f"{ARCH}.rope.freq_base", 10000.0)),
            mlp="swiglu", tie_embeddings="output.weight" not in f.tensors, dropout=0.0)
    except ConfigError as e:
        raise UserError(f"{f.path}: {e}") from None


def load_gguf_model(f: GGUFFile, dtype: torch.dtype = torch.float32) -> Decoder:
    """Our model holding the (dequantized, unpermuted) weights of ``f``, in eval mode."""
    cfg = decoder_config_from_gguf(f)
    with torch.device("meta"):
        model = Decoder(cfg)
    model.to_empty(device="cpu")  # every tensor is overwritten below: skip the random init
    model.to(dtype)
    state, used = model.state_dict(), set()
    for ours, t in state.items():
        if ours == "lm_head.weight" and cfg.tie_embeddings:
            continue
        name = gguf_name(ours)
        if name not in f.tensors:
            raise UserError(f"{f.path}: tensor {name} is missing; is it a complete {ARCH} file?")
        w = f.tensor(name)
        if tuple(w.shape) != tuple(t.shape):
            raise UserError(f"{f.path}: tensor {name} has shape {tuple(w.shape)} but the "
                            f"metadata implies {tuple(t.shape)}")
        heads = _heads_of(ours, cfg)
        with torch.no_grad():
            t.copy_(unpermute_qk(w, heads) if heads else w)
        used.add(name)
    extra = sorted(set(f.tensors) - used)
    if extra:  # e.g. rope_freqs (Llama 3.1 rope scaling) or attention biases
        raise UserError(f"{f.path}: tensor {extra[0]} is not used by lmforge's {ARCH} "
                        "(unsupported variant: rope scaling or biases?)")
    return model.eval()


def special_ids(f: GGUFFile) -> tuple[int | None, int | None]:
    """(BOS id, EOS id) from the tokenizer metadata."""
    bos, eos = (f.meta.get(f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos"))
    return (None if bos is None else int(bos)), (None if eos is None else int(eos))


def chat_template(f: GGUFFile) -> str | None:
    """The Jinja chat template stored in the file, if any."""
    value = f.meta.get("tokenizer.chat_template")
    return value if isinstance(value, str) and value.strip() else None


# --------------------------------------------------------------------------- tokenizer


def _pre_tokenizer(name: str, where: str) -> Any:
    """The ``tokenizers`` pre-tokenizer for a llama.cpp ``tokenizer.ggml.pre`` name."""
    from tokenizers import pre_tokenizers as pt

    byte_level = pt.ByteLevel(add_prefix_space=False, use_regex=True)  # GPT-2's regex
    if name in ("gpt-2", "gpt2"):
        return byte_level
    if name == "smollm":  # llama.cpp: "\p{N}" (each digit alone), then GPT-2's regex
        return pt.Sequence([pt.Digits(individual_digits=True), byte_level])
    raise UserError(f"{where}: tokenizer.ggml.pre = {name!r} is not supported; lmforge rebuilds "
                    "the 'gpt-2' and 'smollm' byte-level pre-tokenizers")


def pre_tokenizer_name(tokenizer_json: dict[str, Any]) -> str | None:
    """The llama.cpp pre-tokenizer name matching a tokenizer.json, or None if none does."""
    pre = tokenizer_json.get("pre_tokenizer") or {}

    def byte_level(p: dict[str, Any]) -> bool:
        return (p.get("type") == "ByteLevel" and not p.get("add_prefix_space")
                and p.get("use_regex", True))

    if byte_level(pre):
        return "gpt-2"
    parts = pre.get("pretokenizers") or []
    if (pre.get("type") == "Sequence" and len(parts) == 2 and byte_level(parts[1])
            and parts[0] == {"type": "Digits", "individual_digits": True}):
        return "smollm"
    return None


def gguf_tokenizer(f: GGUFFile) -> Any:
    """A ``tokenizers`` byte-level BPE with the file's vocabulary, merges and special tokens."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, processors

    kind = f.meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise UserError(f"{f.path}: tokenizer.ggml.model is {kind!r}; lmforge rebuilds byte-level "
                        "BPE ('gpt2') vocabularies only, not SentencePiece ('llama')")
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


@dataclass
class Vocab:
    """A tokenizer.json as GGUF's tokenizer.ggml.* keys hold it."""

    tokens: list[str]
    types: list[int]
    merges: list[str]
    pre: str
    add_bos: bool


def _gguf_vocab(tokenizer_path: Path, vocab_size: int) -> Vocab:
    """The GGUF vocabulary of a tokenizer.json, one entry per embedding row."""
    from tokenizers import Tokenizer

    data = json.loads(tokenizer_path.read_text(encoding="utf-8"))
    pre = pre_tokenizer_name(data)
    if data.get("model", {}).get("type") != "BPE" or pre is None or data.get("normalizer"):
        raise UserError(f"{tokenizer_path}: GGUF export needs a byte-level BPE tokenizer with "
                        "GPT-2's (or SmolLM's) pre-tokenizer and no normalizer, which lmforge "
                        "trains; this one has no llama.cpp equivalent")
    tok = Tokenizer.from_file(str(tokenizer_path))
    # Rows of the embedding that no token uses get placeholder names, as llama.cpp does.
    tokens, types = [f"[PAD{i}]" for i in range(vocab_size)], [UNUSED] * vocab_size
    for text, i in tok.get_vocab(with_added_tokens=True).items():
        if i >= vocab_size:
            raise UserError(f"{tokenizer_path}: token {text!r} has id {i} but the model has only "
                            f"{vocab_size} embedding rows; wrong tokenizer?")
        tokens[i], types[i] = text, NORMAL
    for i, added in tok.get_added_tokens_decoder().items():
        types[i] = CONTROL if added.special else USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"].get("merges", [])]
    # A BOS-prepending post-processor (what gguf_tokenizer builds from add_bos_token) -> true.
    post = data.get("post_processor") or {}
    first = (post.get("single") or [{}])[0] if post.get("type") == "TemplateProcessing" else {}
    return Vocab(tokens, types, merges, pre, "SpecialToken" in first)


# --------------------------------------------------------------------------- writing


@dataclass
class GGUFMeta:
    """What a GGUF file says besides the weights."""

    name: str
    tokenizer: Path
    bos_id: int | None
    eos_id: int | None
    chat_template: str | None = None


def _metadata(w: Any, cfg: DecoderConfig, meta: GGUFMeta, file_type: int) -> None:
    """The llama.cpp architecture and tokenizer keys, on GGUFWriter ``w``."""
    gguf = _gguf()
    w.add_type("model")
    w.add_name(meta.name)
    w.add_file_type(file_type)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_context_length(cfg.block_size)
    w.add_embedding_length(cfg.n_embd)
    w.add_block_count(cfg.n_layer)
    w.add_feed_forward_length(cfg.ffn_dim)
    w.add_head_count(cfg.n_head)
    w.add_head_count_kv(cfg.kv_heads)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    vocab = _gguf_vocab(meta.tokenizer, cfg.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(vocab.pre)
    w.add_token_list(vocab.tokens)
    w.add_token_types(vocab.types)
    w.add_token_merges(vocab.merges)
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


def _encode(t: Tensor, ggml_type: str) -> tuple[np.ndarray, Any]:
    """(array to write, raw GGML type) for one tensor in ``ggml_type``.

    Block types need rows that are a whole number of 32-value blocks; a tensor whose rows are
    not falls back to F16, as llama.cpp's converter does.
    """
    gguf = _gguf()
    qtype = gguf.GGMLQuantizationType[ggml_type]
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if t.ndim == 1 or ggml_type == "F32":  # norms stay F32, as llama.cpp keeps 1-D tensors
        return t.float().numpy(), None
    if ggml_type == "F16" or t.shape[-1] % block:
        return t.half().numpy(), None
    return gguf.quants.quantize(t.float().numpy(), qtype), qtype


def write_gguf(model: Decoder, path: Path, gguf_type: str, meta: GGUFMeta) -> Counter[str]:
    """Write ``model`` as a llama.cpp ``llama`` GGUF; returns the count of each tensor type."""
    gguf = _gguf()
    cfg = model.cfg
    check_exportable(cfg)
    matrix_type, edge_type, file_type = TYPES[gguf_type]
    w = gguf.GGUFWriter(str(path), ARCH)
    _metadata(w, cfg, meta, gguf.LlamaFileType[file_type])
    written: Counter[str] = Counter()
    for ours, t in model.state_dict().items():
        if ours == "lm_head.weight" and cfg.tie_embeddings:
            continue
        heads = _heads_of(ours, cfg)
        t = (permute_qk(t, heads) if heads else t).detach().float().cpu()
        edge = ours in ("tok_emb.weight", "lm_head.weight")
        data, raw = _encode(t, edge_type if edge else matrix_type)
        w.add_tensor(gguf_name(ours), data, raw_dtype=raw)
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

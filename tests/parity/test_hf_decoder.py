"""Parity with transformers, a reference nobody here wrote, for every decoder architecture.

For Llama (GQA), Qwen2 (q/k/v biases, tied head), Mistral (a sliding window shorter than the
test sequences) and GPT-2 (fused Conv1D attention, learned positions): a tiny random
transformers model is saved, imported with `lmforge import`, compared (logits, 20 greedy
tokens), exported with `lmforge export` and loaded back into transformers, compared again.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

transformers = pytest.importorskip("transformers")

from lmforge.cli import run  # noqa: E402
from lmforge.config import UserError  # noqa: E402
from lmforge.infer.generate import generate  # noqa: E402
from lmforge.models.decoder import Decoder, DecoderConfig  # noqa: E402
from lmforge.run import LoadedModel, load_model  # noqa: E402

V = 128  # vocabulary of every test model
WINDOW = 6  # Mistral's sliding window, well under the 48-token and 32-token sequences below
TOL = 1e-4
ARCHS = ["llama", "qwen2", "mistral", "gpt2"]
EXPECTED_ARCH = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "mistral": "MistralForCausalLM", "gpt2": "GPT2LMHeadModel"}
WORDS = ["<unk>", "<s>", "</s>", *(f"w{i}" for i in range(40))]


def hf_model(arch: str) -> Any:
    """A tiny transformers model with random weights large enough for sharp attention."""
    t = transformers
    llama_like = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, max_position_embeddings=64, bos_token_id=1,
                      eos_token_id=2)
    if arch == "llama":  # GQA, untied head, non-default rope base
        model = t.LlamaForCausalLM(t.LlamaConfig(**llama_like, num_key_value_heads=2,
                                                 rope_theta=500.0))
    elif arch == "qwen2":  # biases on q/k/v, tied head
        model = t.Qwen2ForCausalLM(t.Qwen2Config(**llama_like, num_key_value_heads=2,
                                                 tie_word_embeddings=True))
    elif arch == "mistral":  # MQA and a sliding window
        model = t.MistralForCausalLM(t.MistralConfig(**llama_like, num_key_value_heads=1,
                                                     head_dim=16, sliding_window=WINDOW))
    else:
        model = t.GPT2LMHeadModel(t.GPT2Config(vocab_size=V, n_embd=64, n_layer=2, n_head=4,
                                               n_positions=64, bos_token_id=V - 1,
                                               eos_token_id=V - 1))
    return randomize(model)


def randomize(model: Any) -> Any:
    """``model`` in eval mode with std 0.2 matrices, non-trivial biases and norm gains."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.ndim == 2:
                p.copy_(noise * 0.2)
            else:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * noise)
    return model.eval()


def write_tokenizer(arch: str, folder: Path) -> None:
    """A word-level tokenizer.json, or for GPT-2 a vocab.json + merges.txt to be converted."""
    if arch != "gpt2":
        from tokenizers import Tokenizer, models, pre_tokenizers

        tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        tok.save(str(folder / "tokenizer.json"))
        return
    # Byte-level symbols: printable ASCII maps to itself and "Ġ" is the space byte.
    vocab = {chr(c): i for i, c in enumerate(range(33, 127))}
    vocab["Ġ"] = len(vocab)
    for merge in ("h e", "Ġ t", "Ġt he"):
        vocab["".join(merge.split())] = len(vocab)
    vocab["<|endoftext|>"] = V - 1
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\nh e\nĠ t\nĠt he\n", encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))


@dataclass
class Case:
    arch: str
    hf: Any
    src: Path
    run: Path
    loaded: LoadedModel


@pytest.fixture(scope="module", params=ARCHS)
def case(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Case:
    arch = request.param
    root = tmp_path_factory.mktemp(arch)
    model = hf_model(arch)
    model.save_pretrained(root / "hf")
    write_tokenizer(arch, root / "hf")
    assert run(["import", str(root / "hf"), "--out", str(root / "run")]) == 0
    return Case(arch, model, root / "hf", root / "run", load_model(root / "run"))


def ids(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (2, n), generator=torch.Generator().manual_seed(seed))


def max_diff(ours: Decoder, theirs: Any, x: torch.Tensor) -> float:
    with torch.no_grad():
        return (ours(x) - theirs(x).logits).abs().max().item()


def greedy_pair(ours: Decoder, theirs: Any, n: int = 20) -> tuple[list[int], list[int]]:
    """(our 20 greedy tokens via the KV cache, transformers' generate), no EOS stop on either."""
    prompt = ids(12, seed=2)[0].tolist()
    mine = list(generate(ours, prompt, n, temperature=0.0))
    config = transformers.GenerationConfig(do_sample=False, max_new_tokens=n, eos_token_id=None,
                                           pad_token_id=0)
    out = theirs.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt),
                          dtype=torch.long), generation_config=config)
    return mine, out[0, len(prompt):].tolist()


# --------------------------------------------------------------------------- import


def test_import_maps_the_architecture(case: Case) -> None:
    cfg = case.loaded.model.cfg
    assert (cfg.n_layer, cfg.n_embd, cfg.vocab_size, cfg.block_size) == (2, 64, V, 64)
    assert cfg.sliding_window == (WINDOW if case.arch == "mistral" else None)
    assert cfg.qkv_bias == (case.arch == "qwen2")
    assert cfg.kv_heads == {"llama": 2, "qwen2": 2, "mistral": 1, "gpt2": 4}[case.arch]
    assert case.loaded.eos_id == (V - 1 if case.arch == "gpt2" else 2)
    assert case.loaded.step == 0


def test_imported_logits_match_transformers(case: Case) -> None:
    assert max_diff(case.loaded.model, case.hf, ids(48)) <= TOL


def test_imported_greedy_generation_matches_transformers(case: Case) -> None:
    mine, theirs = greedy_pair(case.loaded.model, case.hf)
    assert len(mine) == 20 and mine == theirs


# --------------------------------------------------------------------------- export


def test_export_loads_cleanly_in_transformers_and_matches(case: Case, tmp_path: Path) -> None:
    out = tmp_path / "export"
    assert run(["export", "--run", str(case.run), "--format", "hf", "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == [EXPECTED_ARCH[case.arch]]
    for name in ("model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "generation_config.json"):
        assert (out / name).is_file(), name
    theirs, info = transformers.AutoModelForCausalLM.from_pretrained(
        out, dtype=torch.float32, output_loading_info=True)
    assert not any(info.values()), info
    fresh = load_model(case.run).model  # the export's check rounded `case.loaded` in place
    assert max_diff(fresh, theirs.eval(), ids(48, seed=3)) <= TOL
    mine, hf_tokens = greedy_pair(fresh, theirs)
    assert mine == hf_tokens
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok.eos_token_id == case.loaded.eos_id


# --------------------------------------------------------------------------- the run folder


@pytest.mark.parametrize("case", ["gpt2"], indirect=True)  # one is enough for the CLI path
def test_generate_command_runs_on_an_imported_model(case: Case, capsys: Any) -> None:
    assert run(["generate", "--run", str(case.run), "--prompt", "the", "--greedy",
                "--max_new_tokens", "5"]) == 0
    assert capsys.readouterr().out.startswith("the")
    tok = case.loaded.tokenizer
    assert tok.decode(tok.encode("the hat").ids) == "the hat"  # converted from vocab + merges
    assert tok.encode("<|endoftext|>").ids == [V - 1]


@pytest.mark.parametrize("case", ["gpt2"], indirect=True)
def test_a_failed_load_back_check_leaves_nothing(case: Case, tmp_path: Path) -> None:
    out = tmp_path / "export"  # GPT-2's fp32 difference is ~2e-6: over a 1e-12 tolerance
    message = one_line_error(["export", "--run", str(case.run), "--out", str(out),
                              "--tolerance", "1e-12"])
    assert "differ" in message and not out.exists() and not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    "style",
    [{"n_kv_head": 2},  # the pretrain presets' family: Llama, GQA, tied head
     {"pos": "learned", "norm": "layernorm", "mlp": "gelu", "bias": True},  # GPT-2
     {"qkv_bias": True, "sliding_window": 5, "tie_embeddings": False}],  # Qwen2 + window
)
def test_a_pretrained_lmforge_run_exports(style: dict[str, Any], tmp_path: Path) -> None:
    import yaml

    from lmforge.checkpoint import TrainState, save_checkpoint
    from lmforge.config import to_dict
    from lmforge.data.tokenizer import train_bpe

    cfg = DecoderConfig(vocab_size=300, block_size=32, n_layer=2, n_head=4, n_embd=32,
                        init_std=0.2, **style)
    model = Decoder(cfg)
    model.init_weights(torch.Generator().manual_seed(0))
    run_dir = tmp_path / "run"
    save_checkpoint(run_dir, TrainState(step=7), model, None)
    (run_dir / "config.yaml").write_text(yaml.safe_dump({"model": to_dict(cfg)}))
    train_bpe(["the cat sat on the mat"] * 20, 300).save(str(run_dir / "tokenizer.json"))
    out = tmp_path / "hf"
    assert run(["export", "--run", str(run_dir), "--out", str(out)]) == 0
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert max_diff(model.eval(), theirs.eval(), ids(32)) <= TOL
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok.eos_token == "<|endoftext|>" and tok.decode(tok("the cat")["input_ids"]) == "the cat"


# --------------------------------------------------------------------------- errors


def one_line_error(args: list[str]) -> str:
    with pytest.raises(UserError) as err:
        run(args)
    message = str(err.value)
    assert "\n" not in message
    return message


def test_unsupported_architecture_is_one_line(tmp_path: Path) -> None:
    src = tmp_path / "hf"
    model = transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(
        vocab_size=V, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
        intermediate_size=64))
    model.save_pretrained(src)
    message = one_line_error(["import", str(src), "--out", str(tmp_path / "run")])
    assert "GPTNeoXForCausalLM" in message and "LlamaForCausalLM" in message
    assert not (tmp_path / "run").exists()


def test_shape_mismatch_names_the_tensor_and_both_shapes(tmp_path: Path) -> None:
    src = tmp_path / "hf"
    hf_model("llama").save_pretrained(src)
    write_tokenizer("llama", src)
    config = json.loads((src / "config.json").read_text())
    config["intermediate_size"] = 80
    (src / "config.json").write_text(json.dumps(config))
    message = one_line_error(["import", str(src), "--out", str(tmp_path / "run")])
    assert "model.layers.0.mlp.gate_proj.weight" in message
    assert "(96, 64)" in message and "(80, 64)" in message
    assert not (tmp_path / "run").exists()


def test_dynamic_rope_scaling_is_refused(tmp_path: Path) -> None:
    src = tmp_path / "hf"
    hf_model("llama").save_pretrained(src)
    config = json.loads((src / "config.json").read_text())
    config.pop("rope_parameters", None)
    config["rope_scaling"] = {"rope_type": "dynamic", "factor": 4.0}
    (src / "config.json").write_text(json.dumps(config))
    message = one_line_error(["import", str(src), "--out", str(tmp_path / "run")])
    assert "rope_scaling" in message and "dynamic" in message


def test_offline_hub_name_is_a_clear_error(tmp_path: Path, monkeypatch: Any) -> None:
    import huggingface_hub

    def offline(*args: Any, **kwargs: Any) -> None:
        raise OSError("offline mode is enabled")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    message = one_line_error(["import", "someone/some-model", "--out", str(tmp_path / "r")])
    assert "someone/some-model" in message and "offline" in message


@pytest.mark.parametrize(
    ("changes", "field"),
    [({"pos": "sinusoidal"}, "model.pos"), ({"norm": "layernorm"}, "model.pos/norm/mlp"),
     ({"pos": "learned", "norm": "layernorm", "mlp": "gelu"}, "model.bias"),
     ({"pos": "learned", "norm": "layernorm", "mlp": "gelu", "bias": True, "n_kv_head": 2},
      "model.n_kv_head"),
     ({"bias": True, "sliding_window": 4}, "model.sliding_window")],
)
def test_unexportable_configs_name_the_field(changes: dict[str, Any], field: str) -> None:
    from lmforge.interop.hf import export_architecture

    cfg = DecoderConfig(vocab_size=V, block_size=16, n_layer=1, n_head=4, n_embd=32, **changes)
    with pytest.raises(UserError, match=f"^{field}"):
        export_architecture(cfg)

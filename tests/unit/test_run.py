"""lmforge.run: a run folder becomes a model one way, in the dtype asked for."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from lmforge.checkpoint import TrainState, save_checkpoint
from lmforge.config import ConfigError, UserError, to_dict
from lmforge.models.decoder import Decoder, DecoderConfig
from lmforge.run import load_model, load_run, read_run_spec, resolve_placement
from tests.serve import make_tiny_run


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_run(tmp_path_factory.mktemp("run"), block_size=64)


def _default_init_run(tiny_run: Path, root: Path) -> Path:
    """tiny_run's tokenizer with a 4-layer Llama at the default init (std 0.02)."""
    cfg = DecoderConfig(vocab_size=512, block_size=64, n_layer=4, n_head=4, n_kv_head=2,
                        n_embd=64)
    model = Decoder(cfg)
    model.init_weights(torch.Generator().manual_seed(0))
    run = root / "default-init"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"model": to_dict(cfg)}))
    (run / "tokenizer.json").write_bytes((tiny_run / "tokenizer.json").read_bytes())
    save_checkpoint(run, TrainState(step=3), model, None)
    return run


def test_bf16_load_on_cpu_is_close_to_fp32(tiny_run: Path, tmp_path: Path) -> None:
    run = _default_init_run(tiny_run, tmp_path)
    fp32, bf16 = load_run(run), load_run(run, dtype=torch.bfloat16)
    assert bf16.kind == "decoder" and not bf16.model.training
    assert {p.dtype for p in bf16.model.parameters()} == {torch.bfloat16}
    assert bf16.model.rope_cos.dtype == torch.float32  # angles are not rounded to bf16
    x = torch.randint(0, fp32.model.cfg.vocab_size, (2, 48),
                      generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = fp32.model(x), bf16.model(x)
    assert got.dtype == torch.bfloat16
    # bf16 keeps 8 bits of mantissa: ~2^-8 relative per rounding, a few layers deep.
    diff = (got.float() - want).abs().max()
    print(f"bf16 vs fp32: max |Δlogits| {diff:.2e} of max |logit| {want.abs().max():.2e}")
    assert diff <= 0.02 * want.abs().max()
    assert bool((got.float().argmax(-1) == want.argmax(-1)).float().mean() > 0.9)


def test_spec_reads_the_config_once(tiny_run: Path) -> None:
    spec = read_run_spec(tiny_run)
    assert spec.kind == "decoder" and spec.step == 1 and spec.eos_id == 0
    assert spec.tokenizer == tiny_run / "tokenizer.json"
    assert load_model(spec.checkpoint).step == 1  # a checkpoint folder works too


def test_bad_configs_are_one_line(tiny_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    for name in ("tokenizer.json", "checkpoints", "latest"):
        src = tiny_run / name
        (run / name).symlink_to(src.resolve(), target_is_directory=src.is_dir())
    saved = yaml.safe_load((tiny_run / "config.yaml").read_text())
    cases = [({**saved, "objective": "dpo"}, "objective 'dpo'"),
             ({**saved, "eos_id": "x"}, "eos_id must be a token id"),
             ({"objective": "mlm"}, "has no encoder section")]
    for config, needle in cases:
        (run / "config.yaml").write_text(yaml.safe_dump(config))
        with pytest.raises(UserError, match=needle):
            load_run(run)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU answers")
def test_placement_auto_is_cpu_fp32_without_a_gpu_and_bad_values_name_the_option() -> None:
    assert resolve_placement("auto", "auto") == (torch.device("cpu"), torch.float32)
    assert resolve_placement("cpu", "bf16") == (torch.device("cpu"), torch.bfloat16)
    assert resolve_placement("cpu", "fp16")[1] == torch.float16
    for device, dtype, option in (("gpu", "auto", "device"), ("cuda", "auto", "device"),
                                  ("cuda:0", "fp32", "device"), ("cpu", "int8", "dtype")):
        with pytest.raises(ConfigError, match=f"^{option}:"):
            resolve_placement(device, dtype)


def test_inference_commands_run_in_the_dtype_asked_for(tiny_run: Path,
                                                       capsys: pytest.CaptureFixture) -> None:
    import lmforge
    from lmforge.api import LM
    from lmforge.recipes import chat, eval, generate, serve

    for recipe in (generate, chat, serve, eval):  # one pair of options, from one dataclass
        fields = recipe.Config.__dataclass_fields__
        assert fields["device"].default == "auto" and fields["dtype"].default == "auto"
    lm = lmforge.load(tiny_run, dtype="bf16")
    assert isinstance(lm, LM) and lm.model.lm_head.weight.dtype == torch.bfloat16
    assert lm.engine.cache.k[0].dtype == torch.bfloat16  # the KV cache in the model's dtype
    assert isinstance(lm.generate("The", max_new_tokens=4, temperature=0), str)
    generate.main(generate.Config(run=str(tiny_run), prompt="The", max_new_tokens=4,
                                  greedy=True, dtype="bf16", device="cpu"))
    assert capsys.readouterr().out.startswith("The")


def test_generate_with_a_draft_run_prints_the_greedy_text(tiny_run: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture) -> None:
    from lmforge.recipes import generate

    def text(**kw: object) -> str:
        generate.main(generate.Config(run=str(tiny_run), prompt="The", max_new_tokens=12,
                                      greedy=True, device="cpu", **kw))  # type: ignore[arg-type]
        return capsys.readouterr().out

    plain = text()
    other = _default_init_run(tiny_run, tmp_path)  # same tokenizer, another model
    assert text(draft=str(other)) == plain  # speculative decoding keeps the greedy text
    import shutil

    from tokenizers import Tokenizer

    foreign = tmp_path / "foreign"
    shutil.copytree(tiny_run, foreign)
    tok = Tokenizer.from_file(str(foreign / "tokenizer.json"))
    tok.add_special_tokens(["<|another|>"])
    tok.save(str(foreign / "tokenizer.json"))
    with pytest.raises(UserError, match="^draft: .*tokenizer"):
        text(draft=str(foreign))

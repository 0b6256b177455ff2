"""`lmforge push`: --dry-run writes the export and lists exactly what would be uploaded; a real
push without a network is one clear line and keeps the export."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from lmforge.cli import run
from lmforge.config import UserError
from lmforge.interop.card import CardInfo, model_card
from lmforge.run import load_model
from tests.smoke.helpers import TINY_MODEL, assert_user_error, lmforge


@pytest.fixture(scope="module")
def run_dir(workdir: Path) -> Path:
    proc = lmforge("pretrain", "--data", "prepared", "--run", "pushme", *TINY_MODEL,
                   "--train.max_steps", "2", "--train.batch_size", "2", "--train.eval_every",
                   "2", "--train.save_every", "2", "--train.eval_tokens", "512",
                   "--sample_tokens", "1", cwd=workdir)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return workdir / "runs" / "pushme"


def listed(stdout: str) -> dict[str, int]:
    """{file: size} from the lines `  1,234  name` that push prints."""
    rows = re.findall(r"^\s+([\d,]+)\s{2}(\S+)$", stdout, flags=re.M)
    return {name: int(size.replace(",", "")) for size, name in rows}


def test_dry_run_lists_exactly_the_exported_files(run_dir: Path, workdir: Path) -> None:
    pytest.importorskip("gguf")
    proc = lmforge("push", "--run", str(run_dir), "--repo", "someone/tiny-gguf", "--format",
                   "gguf", "--gguf_type", "q8_0", "--dry-run", cwd=workdir)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    folder = workdir / "exports" / "tiny-gguf-gguf"  # the default --out
    on_disk = {p.name: p.stat().st_size for p in folder.iterdir()}
    assert listed(proc.stdout) == on_disk
    assert set(on_disk) == {"README.md", "pushme.Q8_0.gguf", "Modelfile"}
    assert "would upload 3 files" in proc.stdout and "nothing was uploaded" in proc.stdout
    card = (folder / "README.md").read_text()
    assert "llama-cli -hf someone/tiny-gguf" in card and "max |Δlogits|" in card
    assert "ollama create NAME -f Modelfile" in card


def test_offline_push_is_one_line_and_keeps_the_export(run_dir: Path, workdir: Path,
                                                       monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture) -> None:
    pytest.importorskip("transformers")  # the hf export's load-back check
    hub = pytest.importorskip("huggingface_hub.constants")
    # In-process (the executable is covered above); offline mode makes huggingface_hub refuse
    # every request, so nothing is sent even on a machine with a network and a token.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True, raising=False)
    out = workdir / "exports" / "pushed-hf"
    with pytest.raises(UserError) as err:
        run(["push", "--run", str(run_dir), "--repo", "someone/tiny-llama", "--out", str(out)])
    message = str(err.value)
    assert "\n" not in message and str(out) in message
    assert message.startswith("push to https://huggingface.co/someone/tiny-llama failed")
    files = {p.name: p.stat().st_size for p in out.iterdir()}
    assert {"README.md", "config.json", "model.safetensors", "tokenizer.json"} <= set(files)
    assert listed(capsys.readouterr().out) == files
    assert 'from_pretrained("someone/tiny-llama")' in (out / "README.md").read_text()


def test_bad_repo_names_are_refused() -> None:
    with pytest.raises(UserError, match="--repo user/name"):  # in-process: no model is loaded
        run(["push", "--run", "runs/pushme", "--repo", "no-slash"])


@pytest.mark.parametrize(("fmt", "loading"), [
    ("hf", 'AutoModelForCausalLM.from_pretrained("someone/tiny")'),
    ("gguf", "llama-cli -m pushme.Q8_0.gguf"),
    ("onnx", 'ort.InferenceSession("model.onnx")')])
def test_model_card_states_the_model_its_training_and_how_to_load_it(
        run_dir: Path, fmt: str, loading: str) -> None:
    loaded = load_model(run_dir)
    params = loaded.model.num_params()
    card = model_card(CardInfo(run_dir, loaded.checkpoint, loaded.model.cfg, params, fmt,
                               "float32", "max |Δlogits| = 1.0e-06", ["pushme.Q8_0.gguf"],
                               repo="someone/tiny", eos_id=loaded.eos_id))
    assert card.startswith("---\n") and "- lmforge" in card  # the Hub's metadata header
    for row in (f"| parameters | {params:,} |", "| layers | 2 |", "| width | 32 |",
                "| key/value heads | 2 |", "| context length | 64 |"):
        assert row in card, row
    assert "- data: `prepared` (" in card and "train tokens" in card  # from its manifest
    assert "exported checkpoint: step 2" in card and "validation perplexity" in card
    assert "max |Δlogits| = 1.0e-06" in card and loading in card


def test_export_out_is_a_folder_not_a_file(run_dir: Path, workdir: Path) -> None:
    """Only a GGUF export is one file (--format gguf --out model.gguf writes it)."""
    proc = lmforge("export", "--run", str(run_dir), "--format", "onnx", "--out", "model.onnx",
                   cwd=workdir)
    assert_user_error(proc, "model.onnx names a file", "--out model")
    proc = lmforge("export", "--run", str(run_dir), "--format", "hf", "--out", "model.gguf",
                   cwd=workdir)
    assert_user_error(proc, "model.gguf names a .gguf file", "add --format gguf")
    assert not (workdir / "model.onnx").exists() and not (workdir / "model.gguf").exists()


def test_export_write_failure_is_one_line(run_dir: Path, workdir: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    proc = lmforge("export", "--run", str(run_dir), "--format", "hf", "--out",
                   str(blocker / "export"), cwd=workdir)
    assert_user_error(proc, "cannot write the export", "choose a writable --out")
    assert blocker.read_text() == "not a folder"

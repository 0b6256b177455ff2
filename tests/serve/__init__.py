"""Helpers for the server tests (and the engine/API unit tests): a tiny run, a real server.

``make_tiny_run`` writes a run folder like `lmforge pretrain` does — config.yaml, tokenizer.json
(a BPE trained on CPython's pydoc topics) and a checkpoint of a random-init decoder — in well
under a second. ``Server`` starts `lmforge serve` on it as a subprocess on a free port.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import torch
import yaml

from lmforge.checkpoint import TrainState, save_checkpoint
from lmforge.config import to_dict
from lmforge.data.corpora import pydoc_topics_text
from lmforge.data.tokenizer import train_bpe, vocab_size_of
from lmforge.infer.chat import CHATML
from lmforge.models.decoder import Decoder, DecoderConfig

LMFORGE = [sys.executable, "-m", "lmforge.cli"]


def make_tiny_run(root: Path, name: str = "tiny", *, block_size: int = 128,
                  chat_template: bool = True, seed: int = 0) -> Path:
    """A run folder with a random-init 2-layer Llama (width 64) and a 512-token BPE."""
    texts = [t for _, t in sorted(pydoc_topics_text().items())[:80]]
    tok = train_bpe(texts, vocab_size=512)
    # init_std 0.3 (not 0.02) spreads the logits: greedy picks never hinge on float noise, so
    # a batched row and a lone run must agree token for token.
    cfg = DecoderConfig(vocab_size=vocab_size_of(tok), block_size=block_size, n_layer=2,
                        n_head=4, n_kv_head=2, n_embd=64, init_std=0.3)
    model = Decoder(cfg)
    model.init_weights(torch.Generator().manual_seed(seed))
    run = root / name
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({"model": to_dict(cfg)}), encoding="utf-8")
    tok.save(str(run / "tokenizer.json"))
    save_checkpoint(run, TrainState(step=1), model, None)
    if chat_template:
        (run / "chat_template.jinja").write_text(CHATML, encoding="utf-8")
    return run


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`lmforge serve` in a subprocess; ``url`` is its /v1 base once ``start()`` returns."""

    def __init__(self, run: Path, *args: str) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.url = self.base + "/v1"
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        self.log = run.parent / f"serve-{self.port}.log"
        self._log_file = open(self.log, "w")  # noqa: SIM115 (closed in stop())
        self.proc = subprocess.Popen(
            [*LMFORGE, "serve", "--run", str(run), "--port", str(self.port), *args],
            stdout=self._log_file, stderr=subprocess.STDOUT, env=env)

    def start(self, timeout: float = 60.0) -> Server:
        """Wait until /health answers 200."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.log.read_text()}")
            try:
                if httpx.get(self.base + "/health", timeout=1.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"server did not become healthy: {self.log.read_text()}")

    def stop(self) -> str:
        """Stop the server (Ctrl-C, as a user would) and return everything it printed."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log_file.close()
        return self.log.read_text()

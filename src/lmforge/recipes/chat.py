"""Chat with a run in the terminal: its chat template, replies streamed as they are made.

Type a message and press Enter; the conversation so far goes with each message (the oldest
turns are dropped when it outgrows the context). /reset forgets the conversation, /exit (or
Ctrl-D) quits. Needs jinja2: pip install 'lmforge[serve]'.
"""

from __future__ import annotations

from dataclasses import dataclass

from lmforge.api import load
from lmforge.config import ConfigError
from lmforge.run import Placement

EXAMPLES = """
lmforge chat --run runs/smollm2-instruct
lmforge chat --run runs/shakespeare --template chatml --system "You are a poet."
lmforge chat --run runs/mine --template my_template.jinja --temperature 0
"""
HELP = "commands: /reset forgets the conversation, /exit quits"


@dataclass
class Config(Placement):
    """Options of `lmforge chat`."""

    run: str = "runs/shakespeare"
    """A run folder (uses its latest checkpoint) or one checkpoint folder."""
    template: str | None = None
    """Chat template: chatml or a .jinja file; null = the run folder's own."""
    system: str = ""
    """A system message that starts every conversation; empty = none."""
    max_new_tokens: int = 256
    """Longest reply, in tokens."""
    temperature: float = 0.7
    """Sampling temperature; 0 is greedy."""
    top_k: int | None = 50
    """Sample only among the k most likely tokens; null disables."""
    top_p: float | None = None
    """Nucleus sampling: the smallest set of tokens whose probability reaches p; null disables."""
    repetition_penalty: float = 1.0
    """Penalty on tokens already in the conversation (1 = off, 1.1 is mild)."""
    seed: int | None = None
    """Random seed; the same seed and messages give the same replies."""

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens: must be >= 1, got {self.max_new_tokens}")


def main(cfg: Config) -> int:
    """Read messages from stdin until /exit or end of input; stream each reply."""
    lm = load(cfg.run, template=cfg.template, max_batch=1, device=cfg.device, dtype=cfg.dtype,
              quant=cfg.quant)  # one conversation, one slot
    _ = lm.template  # no template: fail now, with the fix, not after the first message
    start = [{"role": "system", "content": cfg.system}] if cfg.system else []
    history = list(start)
    print(f"lmforge chat: {lm.run_dir} (template {lm.template.origin}); {HELP}", flush=True)
    turn = 0
    while True:
        try:
            line = input("> ")
        except EOFError:
            print()
            break
        command = line.strip()
        if command in ("/exit", "/quit"):
            break
        if command == "/reset":
            history = list(start)
            print("(conversation cleared)", flush=True)
            continue
        if not command:
            continue
        history.append({"role": "user", "content": line})
        pieces = []
        seed = None if cfg.seed is None else cfg.seed + turn
        for piece in lm.chat(history, max_new_tokens=cfg.max_new_tokens,
                             temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
                             repetition_penalty=cfg.repetition_penalty, seed=seed, stream=True):
            print(piece, end="", flush=True)
            pieces.append(piece)
        print(flush=True)
        history.append({"role": "assistant", "content": "".join(pieces)})
        turn += 1
    return 0

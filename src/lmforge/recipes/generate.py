"""Generate text from a trained run or checkpoint, streaming tokens to the terminal."""

from __future__ import annotations

from dataclasses import dataclass

from rich.console import Console

from lmforge.config import ConfigError
from lmforge.infer.sampling import SamplingParams
from lmforge.infer.speculative import DRAFT_TOKENS, check_draft_tokenizer
from lmforge.infer.text import stream_text
from lmforge.run import Placement, load_model

EXAMPLES = """
lmforge generate --run runs/shakespeare --prompt "ROMEO."
lmforge generate --run runs/shakespeare --prompt "To be" --greedy
lmforge generate --run runs/shakespeare/checkpoints/step_00000400 --top_p 0.9 --seed 7
"""


@dataclass
class Config(Placement):
    """Options of `lmforge generate`."""

    run: str = "runs/shakespeare"
    """A run folder (uses its latest checkpoint) or one checkpoint folder."""
    prompt: str = ""
    """Text to continue; empty starts a new document."""
    max_new_tokens: int = 200
    """Stop after this many new tokens (or at end-of-text, or at the model's context limit)."""
    temperature: float = 0.8
    """Sampling temperature; 0 is greedy."""
    greedy: bool = False
    """Always pick the most likely token (same as --temperature 0)."""
    top_k: int | None = 50
    """Sample only among the k most likely tokens; null disables."""
    top_p: float | None = None
    """Nucleus sampling: the smallest set of tokens whose probability reaches p; null disables."""
    seed: int | None = None
    """Random seed for sampling; the same seed gives the same text."""
    draft: str | None = None
    """A smaller run with the same tokenizer that proposes tokens (speculative decoding: the same output distribution, the same greedy text, fewer forwards of the big model); null = none."""
    compile: bool = False
    """Compile the decode step with torch.compile: faster tokens once compiled, but compiling takes from seconds (GPU) to minutes (a busy CPU); falls back to eager with a warning."""

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens: must be >= 1, got {self.max_new_tokens}")
        # The ranges of the sampling options are the engine's and the server's: checked once.
        SamplingParams(max_tokens=self.max_new_tokens, temperature=self.temperature,
                       top_k=self.top_k, top_p=self.top_p, seed=self.seed).check()


def main(cfg: Config) -> int:
    """Load the model and stream a continuation of the prompt."""
    console = Console(highlight=False)
    if cfg.draft is not None and cfg.compile:
        raise ConfigError("compile: applies to plain decoding; leave it off with --draft")
    # One row at a time; with a draft the target checks k+1 positions per forward instead.
    loaded = load_model(cfg.run, cfg.device, cfg.dtype, cfg.quant,
                        rows=1 if cfg.draft is None else DRAFT_TOKENS + 1)
    draft = None
    if cfg.draft is not None:  # the same placement (device, dtype, quant) as the target
        draft = load_model(cfg.draft, cfg.device, cfg.dtype, cfg.quant, rows=1)
        check_draft_tokenizer(cfg.run, cfg.draft, loaded.tokenizer, draft.tokenizer)
    console.print(cfg.prompt, end="", style="bold", markup=False)
    stream_text(loaded, cfg.prompt, console, max_new_tokens=cfg.max_new_tokens,
                temperature=0.0 if cfg.greedy else cfg.temperature, top_k=cfg.top_k,
                top_p=cfg.top_p, seed=cfg.seed,
                eos_id=loaded.eos_id, compile=cfg.compile,
                draft=None if draft is None else draft.model)
    console.print()
    return 0

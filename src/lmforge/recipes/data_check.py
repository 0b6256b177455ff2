"""Check a fine-tuning JSONL file against a run's tokenizer and chat template before training.

Reports schema errors by file:line, wrong role order, empty turns, exact duplicates, the token
length distribution against the maximum length and how many rows would be cut, and the
fraction of tokens that carry loss (assistant replies and their end-of-turn token). Exits 2
when no assistant token or no end-of-turn token would be trained — the same refusal
`lmforge finetune` makes.
"""

from __future__ import annotations

from dataclasses import dataclass

from rich.console import Console
from rich.table import Table

from lmforge.config import UserError
from lmforge.data.check import check_sft, refusals
from lmforge.infer.chat import chat_setup
from lmforge.run import load_model

POSITIONAL = ("data",)
EXAMPLES = """
lmforge data check train.jsonl --run runs/shakespeare
lmforge data check chats.jsonl --run runs/smollm2 --max_len 1024
"""


@dataclass
class Config:
    """Options of `lmforge data check`."""

    data: str = "train.jsonl"
    """The JSONL file to check ({prompt, completion}, {messages} or {conversations} rows)."""
    run: str = "runs/shakespeare"
    """The run whose tokenizer and chat template the data will be trained with."""
    template: str | None = None
    """Chat template: a built-in (chatml) or a .jinja file; null = the run's own, else chatml."""
    max_len: int | None = None
    """Maximum tokens per example; null = the model's block_size."""
    show_errors: int = 10
    """Print at most this many bad rows."""


def main(cfg: Config) -> int:
    """Print the report; raise (exit 2) when training on the file would be pointless."""
    console = Console()
    loaded = load_model(cfg.run)
    tok = loaded.tokenizer
    template, eot = chat_setup(loaded.run_dir, cfg.template, tok, loaded.eos_id)  # type: ignore[arg-type]
    max_len = cfg.max_len or loaded.model.cfg.block_size
    report = check_sft(cfg.data, tok, template, eot, max_len)  # type: ignore[arg-type]
    for err in report.errors[: cfg.show_errors]:
        console.print(err, markup=False, highlight=False)
    if len(report.errors) > cfg.show_errors:
        console.print(f"... and {len(report.errors) - cfg.show_errors} more bad rows")
    table = Table(title=f"{cfg.data} (template {template.origin}, end of turn {eot!r})")
    table.add_column("check")
    table.add_column("value", justify="right")
    for key, value in report.summary().items():
        if key != "path":
            table.add_row(key, f"{value:.3f}" if isinstance(value, float) else str(value))
    console.print(table)
    reasons = refusals(report, eot)
    if reasons:
        raise UserError("; ".join(reasons))
    return 0

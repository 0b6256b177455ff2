"""Check a fine-tuning JSONL file against a run's tokenizer and chat template before training.

Reports schema errors by file:line, wrong role order, empty turns, exact duplicates, the token
length distribution against the maximum length and how many rows would be cut, and the
fraction of tokens that carry loss (assistant replies and their end-of-turn token). Exits 2
when no assistant token or no end-of-turn token would be trained — the same refusal
`lmforge finetune` makes.

A file whose first row has `chosen` and `rejected` is checked as preference pairs (`finetune
--task dpo|ipo|orpo|simpo`): bad rows, empty or identical chosen/rejected replies and replies
that max_len would cut off entirely are errors by file:line (exit 2); it counts duplicates,
replies cut in part, and the length distribution.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from lmforge.config import UserError
from lmforge.data.check import check_sft, refusals
from lmforge.data.preference import check_preference, is_preference_file
from lmforge.infer.chat import chat_setup
from lmforge.run import load_model

POSITIONAL = ("data",)
EXAMPLES = """
lmforge data check train.jsonl --run runs/shakespeare
lmforge data check chats.jsonl --run runs/smollm2 --max_len 1024
lmforge data check pairs.jsonl --run runs/smollm2      # {prompt, chosen, rejected} rows
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
    pairs = Path(cfg.data).is_file() and is_preference_file(cfg.data)
    report = (check_preference if pairs else check_sft)(cfg.data, tok, template, eot,  # type: ignore[operator]
                                                        max_len)
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
    if pairs:
        if report.errors:
            more = f" (and {len(report.errors) - 1} more bad rows)" if len(report.errors) > 1 else ""
            raise UserError(report.errors[0] + more)
        return 0
    reasons = refusals(report, eot)  # type: ignore[arg-type]
    if reasons:
        raise UserError("; ".join(reasons))
    return 0

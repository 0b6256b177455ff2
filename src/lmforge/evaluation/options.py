"""Options of `lmforge eval`."""

from __future__ import annotations

from dataclasses import dataclass

from lmforge.config import ConfigError
from lmforge.run import Placement


@dataclass
class Config(Placement):
    """Options of `lmforge eval`."""

    run: str = "runs/shakespeare"
    """The run to evaluate (a run folder or one of its checkpoints)."""
    data: str = "test.jsonl"
    """A .txt file, or JSONL of {text}, {prompt, completion}, {messages} or {conversations} rows."""
    baseline: str | None = None
    """A second run evaluated the same way, shown side by side."""
    template: str | None = None
    """Chat template: a built-in (chatml) or a .jinja file; null = each run's own, else chatml."""
    max_examples: int = 200
    """Evaluate at most this many rows (the first ones)."""
    max_new_tokens: int = 64
    """Longest generated reply."""
    batch_size: int = 8
    """Sequences per forward pass for the loss."""
    threads: int | None = None
    """CPU threads for torch; null = torch's default."""
    text_field: str = "text"
    """Classifier runs: the JSONL/CSV field holding the text."""
    label_field: str = "label"
    """Classifier runs: the field holding the label (a name the classifier was trained on)."""
    shots: int | None = None
    """Solved examples before each question: earlier chat turns for --data, num_fewshot for --harness; null = none for --data, each task's own default for --harness."""
    shots_file: str | None = None
    """--data: chat JSONL the shots are drawn from; null = the other rows of --data."""
    seed: int = 0
    """Seed of the shot draws (--data, --harness) and of the --memorization sample."""
    harness: str | None = None
    """lm-evaluation-harness tasks to run instead of --data, comma-separated (mmlu,hellaswag,arc_easy; hub tasks need their datasets online or cached). Needs pip install 'lmforge[harness]'."""
    harness_include: str | None = None
    """--harness: a folder of extra task YAMLs, e.g. tests/data/harness (lmforge_mc, offline)."""
    harness_chat_template: bool = False
    """--harness: render prompts with the run's chat template (the harness's default is plain text)."""
    limit: int | None = None
    """--harness: at most this many examples per task; null = all."""
    memorization: bool = False
    """Instead of --data: the fraction of training windows whose next mem_suffix tokens greedy decoding reproduces exactly from the first mem_prefix."""
    mem_samples: int = 100
    """--memorization: windows sampled (distinct; fewer if the data has fewer)."""
    mem_prefix: int = 32
    """--memorization: prompt tokens, the start of each window."""
    mem_suffix: int = 32
    """--memorization: tokens that must be reproduced exactly."""
    mem_from_start: bool = False
    """--memorization: windows open documents (one per document); else uniform over positions."""
    mem_data: str | None = None
    """--memorization: the prepared dataset folder; null = the `data` of the run's config.yaml."""
    mem_split: str = "train"
    """--memorization: split to sample (val gives a held-out control)."""

    def __post_init__(self) -> None:
        if self.max_examples < 1 or self.max_new_tokens < 1 or self.batch_size < 1:
            raise ConfigError("max_examples, max_new_tokens and batch_size must be >= 1")
        if min(self.mem_samples, self.mem_prefix, self.mem_suffix) < 1:
            raise ConfigError("mem_samples, mem_prefix and mem_suffix must be >= 1")
        if (self.shots is not None and self.shots < 0) or (self.limit is not None
                                                           and self.limit < 1):
            raise ConfigError("shots must be >= 0 and limit >= 1 (or null)")
        if self.harness is not None and self.memorization:
            raise ConfigError("harness and memorization: choose one per command")
        if self.harness is not None and self.shots_file is not None:
            raise ConfigError("shots_file: the harness draws shots from each task's own "
                              "fewshot split; drop --shots_file")


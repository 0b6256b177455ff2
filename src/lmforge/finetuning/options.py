"""The options of fine-tuning."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from lmforge.config import (
    ConfigError,
    DistConfig,
    OptimConfig,
    TrainConfig,
)
from lmforge.models.lora import LoraConfig
from lmforge.train.finetune import (
    Method,
)
from lmforge.train.losses import PreferenceConfig


@dataclass
class Config:
    """Options of `lmforge finetune`."""

    run: str = "runs/shakespeare"
    """The base: a decoder run folder (pretrained or imported) or one of its checkpoints; classify: an encoder run or a Hugging Face BERT folder (config.json, model.safetensors, tokenizer.json)."""
    data: str = "train.jsonl"
    """JSONL of {prompt, completion}, {messages: [...]} or {conversations: [...]} rows; dpo/ipo/orpo/simpo: {prompt, chosen, rejected} rows."""
    out: str = "finetuned"
    """Name of the new run, written to <runs_dir>/<out>/."""
    task: Literal["chat", "classify", "dpo", "ipo", "orpo", "simpo"] = "chat"
    """chat = a decoder on chat/completion rows; classify = an encoder run (`pretrain --objective mlm`) with a classification head on {text, label} rows; dpo, ipo, orpo, simpo = a decoder on preference pairs (dpo/ipo against the frozen base: with LoRA the model with adapters off, with --method full log-probs computed once before training)."""
    text_field: str = "text"
    """classify: the JSONL field holding the text."""
    label_field: str = "label"
    """classify: the JSONL field holding the label (string or integer)."""
    val_data: str | None = None
    """classify: JSONL of held-out rows for val accuracy / macro-F1; dpo/ipo/orpo/simpo: held-out pairs for val reward accuracy; null = --val_fraction of --data."""
    test_data: str | None = None
    """classify: JSONL of test rows, scored with the untrained head before training and once after (never used for training or early stopping)."""
    method: Method = "lora"
    """full = every weight trains; lora = low-rank adapters on a frozen base; qlora = lora over an NF4 (4-bit) base."""
    runs_dir: str = "runs"
    """Folder that holds all runs."""
    template: str | None = None
    """Chat template: a built-in (chatml) or a .jinja file; null = the base run's own, else chatml."""
    max_len: int | None = None
    """Tokens per example (longer ones are cut); null = the model's block_size."""
    val_fraction: float = 0.1
    """Share of the rows held out to report val loss on reply tokens (0 = none)."""
    pack: bool = False
    """Pack whole examples back to back into rows of up to max_len tokens (less padding); each attends only within itself."""
    group_by_length: bool = False
    """Batch examples of similar length together (less padding)."""
    pref: PreferenceConfig = field(default_factory=PreferenceConfig)
    """Strengths of the preference losses (--task dpo, ipo, orpo, simpo)."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """Adapters of --method lora/qlora."""
    base_dtype: Literal["fp32", "bf16"] = "fp32"
    """--method lora: storage of the frozen base's linear weights; bf16 halves their memory (they compute in bf16; adapters, norms and embeddings stay fp32)."""
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=2e-4, warmup_steps=10,
                                                                   weight_decay=0.0))
    """Optimizer and schedule (fine-tuning defaults: lr 2e-4, 10 warmup steps, no decay)."""
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        max_steps=100, batch_size=8, eval_every=50, save_every=100, trackers=[]))
    """Training loop."""
    dist: DistConfig = field(default_factory=DistConfig)
    """Device, and several processes through torchrun: DDP, or FSDP2 with the (frozen) base sharded."""
    overwrite: bool = False
    """Delete an existing run of the same name and start over."""
    resume: bool = False
    """Continue the --out run from its latest checkpoint: weights, optimizer, schedule, RNG and data position, so it ends as an uninterrupted run would."""

    def __post_init__(self) -> None:
        if not self.out or "/" in self.out or self.out.startswith("."):
            raise ConfigError(f"out: '{self.out}' is not a valid run name (no '/', not hidden)")
        if self.resume and self.overwrite:
            raise ConfigError("resume and overwrite contradict each other; choose one")
        if self.task != "classify" and self.test_data:
            raise ConfigError("test_data: only --task classify reads it")
        if self.task == "chat" and self.val_data:
            raise ConfigError("val_data: --task chat holds out --val_fraction of --data instead")
        if self.pack and self.task not in ("chat", "classify"):
            raise ConfigError(f"pack: --task {self.task} keeps each pair's two rows apart; "
                              "drop --pack (--group_by_length works)")
        if not 0 <= self.val_fraction < 1:
            raise ConfigError(f"val_fraction: must be in [0, 1), got {self.val_fraction}")
        if self.max_len is not None and self.max_len < 2:
            raise ConfigError(f"max_len: must be >= 2, got {self.max_len}")
        if self.train.seq_len is not None:
            raise ConfigError("train.seq_len: fine-tuning cuts examples at --max_len; use that")
        if self.train.eval_tokens != TrainConfig.eval_tokens:
            raise ConfigError("train.eval_tokens: fine-tuning evaluates every held-out example "
                              "(--val_fraction, --val_data); leave it unset")
        if self.dist.tp > 1:
            raise ConfigError("dist.tp: tensor parallelism is for pretraining; fine-tune with "
                              "--dist.strategy ddp or fsdp")
        if self.base_dtype == "bf16" and (self.method != "lora" or self.dist.strategy == "fsdp"):
            raise ConfigError("base_dtype bf16: for --method lora without FSDP (FSDP2 shards "
                              "parameters of one dtype per block)")
        if self.method == "qlora" and self.dist.strategy == "fsdp":
            raise ConfigError("method qlora: its NF4 base is stored in buffers FSDP does not "
                              "shard; use --dist.strategy ddp, or --method lora under FSDP")



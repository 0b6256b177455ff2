"""The options of pretraining: objectives, the model section each one reads, presets and
``--init_from`` underneath what the user set."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from lmforge.config import (
    ConfigError,
    DistConfig,
    OptimConfig,
    TrainConfig,
    merge,
    to_dict,
)
from lmforge.data.mlm import (
    MaskingConfig,
)
from lmforge.models.decoder import DecoderConfig
from lmforge.models.encoder import EncoderConfig
from lmforge.models.registry import Family, preset, preset_names
from lmforge.models.seq2seq import Seq2SeqConfig
from lmforge.run import read_run_spec

Objective = Literal["clm", "mlm", "seq2seq"]
OBJECTIVES: tuple[Objective, ...] = ("clm", "mlm", "seq2seq")
# The model section each objective reads; the other two must be left alone.
SECTIONS = ("model", "encoder", "seq2seq")
# Val masks are the same for every run (whatever --train.seed), so runs compare on equal terms.
VAL_MASK_SEED = 0

def _family(objective: str) -> tuple[Family, str, str]:
    """(model family, its config section, its default preset) for an objective."""
    return {
        "clm": ("decoder", "model", "llama-1m"),
        "mlm": ("encoder", "encoder", "bert-mini"),
        "seq2seq": ("seq2seq", "seq2seq", "transformer-tiny"),
    }[objective]  # type: ignore[return-value]


@dataclass
class Config:
    """Options of `lmforge pretrain`."""

    objective: Objective = "clm"
    """What to learn: clm = next token (decoder), mlm = masked tokens (BERT encoder), seq2seq = source -> target pairs (encoder-decoder)."""
    data: str = "data/shakespeare"
    """clm/mlm: a prepared dataset folder (`lmforge data prepare`); seq2seq: a pairs folder with train.jsonl, val.jsonl, tokenizer.json (`lmforge data synth`)."""
    run: str = "shakespeare"
    """Run name: config, metrics, checkpoints and plots go to <runs_dir>/<run>/."""
    runs_dir: str = "runs"
    """Folder that holds all runs."""
    init_from: str | None = None
    """Continued pretraining (--objective clm): start from this run or imported model (a run folder or one of its checkpoints) — its architecture and weights — instead of a fresh init. Prepare the data with its tokenizer: `lmforge data prepare --tokenizer RUN/tokenizer.json`. --model.* may still change what does not change a weight's shape (dropout, rope_theta)."""
    preset: str | None = None
    """Named model preset of the objective's family; null = llama-1m (clm), bert-mini (mlm), transformer-tiny (seq2seq). Decoders: llama-1m, llama-6m, llama-15m, gpt2-124m; encoders: bert-tiny, bert-mini, bert-small, bert-base; encoder-decoders: transformer-tiny, transformer-small, transformer-base."""
    model: DecoderConfig = field(default_factory=DecoderConfig)
    """Decoder architecture for --objective clm (filled from --preset)."""
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    """Encoder architecture for --objective mlm (filled from --preset)."""
    seq2seq: Seq2SeqConfig = field(default_factory=Seq2SeqConfig)
    """Encoder-decoder architecture for --objective seq2seq (filled from --preset)."""
    mlm: MaskingConfig = field(default_factory=MaskingConfig)
    """Masking of --objective mlm."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer and schedule."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Training loop."""
    dist: DistConfig = field(default_factory=DistConfig)
    """Distributed training under torchrun (DDP or FSDP2)."""
    resume: bool = False
    """Continue an existing run from its latest checkpoint: weights, optimizer, schedule, data
    position and RNG, so the result is the same as an uninterrupted run."""
    overwrite: bool = False
    """Delete an existing run of the same name and start over."""
    samples: list[str] = field(default_factory=lambda: ["ROMEO.\n", "To be, or not to be"])
    """clm: prompts to sample from at the end of training (comma-separated on the command line)."""
    sample_tokens: int = 120
    """clm: tokens generated per end-of-run sample."""
    temperature: float = 0.8
    """clm: sampling temperature of the end-of-run samples."""

    def __post_init__(self) -> None:
        if not self.run or "/" in self.run or self.run.startswith("."):
            raise ConfigError(f"run: '{self.run}' is not a valid run name (no '/', not hidden)")
        if self.resume and self.overwrite:
            raise ConfigError("resume and overwrite contradict each other; choose one")
        if self.sample_tokens < 0 or self.temperature < 0:
            raise ConfigError("sample_tokens and temperature must be >= 0")

    @property
    def section(self) -> str:
        """The name of the model section this objective uses."""
        return _family(self.objective)[1]

    @property
    def model_cfg(self) -> DecoderConfig | EncoderConfig | Seq2SeqConfig:
        """The architecture this objective trains."""
        return getattr(self, self.section)


def resolve(data: dict[str, Any]) -> dict[str, Any]:
    """Fill the objective's model section from the preset, underneath what the user set."""
    objective = data.get("objective", "clm")
    if objective not in OBJECTIVES:
        raise ConfigError(f"objective: must be one of {', '.join(OBJECTIVES)}; got {objective!r}")
    family, section, default = _family(objective)
    for other in (*SECTIONS, "mlm"):
        if other not in _used_sections(objective) and data.get(other):
            raise ConfigError(f"{other}.*: options of a section that --objective {objective} "
                              f"does not use; its model options are --{section}.*")
    if data.get("init_from"):
        return _from_run(data, objective)
    name = data.get("preset") or default
    if not isinstance(name, str):
        raise ConfigError(f"preset: must be a name, one of {', '.join(preset_names(family))}")
    base = to_dict(preset(name, family))
    return {**data, "preset": name, section: merge(base, data.get(section) or {})}


def _from_run(data: dict[str, Any], objective: str) -> dict[str, Any]:
    """--init_from: the model section is the run's own, under what the user set."""
    if objective != "clm":
        raise ConfigError("init_from: continued pretraining starts a decoder (--objective clm)")
    if data.get("preset"):
        raise ConfigError("init_from, preset: the architecture comes from --init_from; drop "
                          "--preset")
    spec = read_run_spec(str(data["init_from"]))
    if spec.kind != "decoder":
        raise ConfigError(f"init_from: {spec.run_dir} is {spec.kind} run, not a decoder")
    return {**data, "model": merge(to_dict(spec.model_cfg), data.get("model") or {})}


def _used_sections(objective: str) -> set[str]:
    return {_family(objective)[1], *(["mlm"] if objective == "mlm" else [])}


def saved_config(cfg: Config) -> dict[str, Any]:
    """The config to write beside the run: without the sections its objective does not use."""
    unused = {*SECTIONS, "mlm"} - _used_sections(cfg.objective)
    return {k: v for k, v in to_dict(cfg).items() if k not in unused}



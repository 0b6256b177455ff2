"""Fine-tune a decoder run on chat data: full, LoRA or QLoRA, through the one training loop.

Reads prompt/completion, `messages` or ShareGPT `conversations` JSONL, renders every row with
the base run's chat template (else ChatML) and trains on the assistant tokens and each reply's
end-of-turn token only. The checks of `lmforge data check` run first: a file that would train
no reply token or no end-of-turn token is refused before anything is written. The new run
folder loads like any other (`lmforge generate`, `chat`, `eval`): its checkpoint holds the
merged weights; LoRA/QLoRA runs also keep adapter.safetensors + adapter.json (`lmforge merge`).

--task classify fine-tunes an encoder instead (an encoder run, or a Hugging Face BERT folder
such as all-MiniLM-L6-v2's), with a new classification head on {text, label} rows, and reports
val (and test) accuracy and macro-F1 before and after.

--resume continues an interrupted run from its latest checkpoint (weights, optimizer, RNG and
data position), so it ends bit-identical to a run that was never stopped.
"""

from __future__ import annotations

import functools
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from rich.console import Console
from safetensors.torch import save as safetensors_bytes
from tokenizers import Tokenizer
from torch import Tensor, nn

from lmforge.checkpoint import TrainState, checkpoint_weights, latest_checkpoint
from lmforge.config import (
    ConfigError,
    DistConfig,
    OptimConfig,
    TrainConfig,
    UserError,
    load_yaml,
    to_dict,
)
from lmforge.data.check import CheckReport, check_sft, refusals
from lmforge.data.classify import Items, classify_batch, classify_ids, encoder_tokenizer
from lmforge.data.mlm import PAD_TOKEN
from lmforge.data.sft import SftBatches, eval_batches, rank_share, read_labeled, to_example
from lmforge.data.tokenizer import load_tokenizer
from lmforge.eval.classify import class_metrics
from lmforge.eval.lm import lm_loss, lm_metrics
from lmforge.infer.chat import ChatTemplate, chat_setup
from lmforge.interop.hf import TOKENIZER_FILE
from lmforge.models.decoder import Decoder
from lmforge.models.encoder import EncoderForClassification
from lmforge.models.lora import LoraConfig, adapter_state_dict, lora_info
from lmforge.models.quant import nf4_summary, storage_bytes
from lmforge.run import (
    ADAPTER_FILE,
    ADAPTER_INFO,
    SIDE_FILES,
    LoadedModel,
    load_classifier_base,
    read_run_spec,
    write_run_files,
)
from lmforge.train.finetune import (
    Method,
    adapt,
    adapted_builder,
    data_digest,
    replay,
    restore,
    save_final,
    save_resumable,
)
from lmforge.train.loop import LoopHooks
from lmforge.train.losses import causal_lm_loss, packed_lm_loss, token_loss
from lmforge.train.schedule import resolved
from lmforge.train.session import run_training
from lmforge.train.setup import (
    Setup,
    data_ranks,
    gather_full,
    resolve_strategy,
    setup_training,
)
from lmforge.utils.dist import DistInfo, barrier, init_distributed, on_main, shutdown
from lmforge.utils.io import atomic_write_bytes, atomic_write_json, atomic_write_text
from lmforge.utils.logging import read_metrics, truncate_metrics
from lmforge.utils.plot import plot_loss_curve
from lmforge.utils.seed import seed_everything
from lmforge.utils.trackers import check_trackers

EXAMPLES = """
lmforge finetune --run shakespeare --data chat.jsonl --method lora --out chat-lora
lmforge finetune --run smollm2 --data qa.jsonl --method qlora --lora.rank 16 --out qa
lmforge finetune --run shakespeare --data pc.jsonl --method full --train.max_steps 300 --out pc
lmforge finetune --task classify --run runs/bert --data reviews.jsonl --method full --out senti
lmforge finetune --run smollm2 --data qa.jsonl --out qa --resume   # continue after a stop
torchrun --nproc_per_node 2 -m lmforge.cli finetune --run smollm2 --data qa.jsonl --out qa \\
    --dist.strategy fsdp                      # LoRA over a base sharded across 2 processes
"""


@dataclass
class Config:
    """Options of `lmforge finetune`."""

    run: str = "runs/shakespeare"
    """The base: a decoder run folder (pretrained or imported) or one of its checkpoints; classify: an encoder run or a Hugging Face BERT folder (config.json, model.safetensors, tokenizer.json)."""
    data: str = "train.jsonl"
    """JSONL of {prompt, completion}, {messages: [...]} or {conversations: [...]} rows."""
    out: str = "finetuned"
    """Name of the new run, written to <runs_dir>/<out>/."""
    task: Literal["chat", "classify"] = "chat"
    """chat = a decoder on chat/completion rows; classify = an encoder run (`pretrain --objective mlm`) with a classification head on {text, label} rows."""
    text_field: str = "text"
    """classify: the JSONL field holding the text."""
    label_field: str = "label"
    """classify: the JSONL field holding the label (string or integer)."""
    val_data: str | None = None
    """classify: JSONL of held-out rows for val accuracy / macro-F1; null = --val_fraction of --data."""
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
        if self.task != "classify" and (self.val_data or self.test_data):
            raise ConfigError("val_data, test_data: only --task classify reads them")
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


def checked_data(cfg: Config, tok: Tokenizer, template: ChatTemplate, eot: str,
                 max_len: int) -> CheckReport:
    """The data check; a bad row or a refusal is a UserError before anything is written."""
    report = check_sft(cfg.data, tok, template, eot, max_len)
    if report.errors:
        more = f" (and {len(report.errors) - 1} more)" if len(report.errors) > 1 else ""
        raise UserError(f"{report.errors[0]}{more}; see `lmforge data check {cfg.data}`")
    reasons = refusals(report, eot)
    if reasons:
        raise UserError("; ".join(reasons))
    return report


def save_adapter(run_dir: Path, model: nn.Module, info: dict[str, Any]) -> None:
    """adapter.safetensors (the LoRA tensors only) and adapter.json (base run and settings)."""
    atomic_write_bytes(run_dir / ADAPTER_FILE, safetensors_bytes(adapter_state_dict(model)))
    atomic_write_json(run_dir / ADAPTER_INFO, info)


def _split(report: CheckReport, max_len: int, val_fraction: float,
           seed: int) -> tuple[list, list]:
    examples = [to_example(e, max_len) for e in report.encoded]
    examples = [e for e in examples if bool((e[1] != -100).any())]  # cut to nothing: skip
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = int(len(examples) * val_fraction)
    if n_val == 0 or n_val == len(examples):
        return [examples[i] for i in order], []
    return [examples[i] for i in order[n_val:]], [examples[i] for i in order[:n_val]]


def with_length(cfg: Config, examples: int, ranks: int) -> Config:
    """cfg with --train.epochs / --optim.warmup_ratio resolved over ``examples`` train rows."""
    per_epoch = examples / (cfg.train.batch_size * cfg.train.grad_accum * ranks)
    train_cfg, optim_cfg = resolved(cfg.train, cfg.optim, per_epoch)
    return replace(cfg, train=train_cfg, optim=optim_cfg)


def _prepare_dir(run_dir: Path, overwrite: bool) -> None:
    if run_dir.exists():
        if not overwrite:
            raise UserError(f"{run_dir} exists; pass --resume to continue it, --overwrite to "
                            "replace it, or pick another --out")
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)


# --------------------------------------------------------------------------- run folder, resume

# Options a resumed run may change: where and how it reports, not what it computes (a new
# --train.max_steps, as in pretrain, continues on the schedule of the new length).
RESUME_FREE = ("resume", "overwrite", "train.threads", "train.max_steps", "train.log_every",
               "train.eval_every", "train.save_every", "train.keep_last", "train.trackers")


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def start_run_dir(cfg: Config, run_dir: Path, info: DistInfo) -> None:
    """Rank 0 creates a new run's folder (never clobbering one by accident), or checks that the
    run --resume continues was started with the same options; a refusal stops every rank."""
    on_main(info, lambda: _start_run_dir(cfg, run_dir))


def _start_run_dir(cfg: Config, run_dir: Path) -> None:
    check_trackers(cfg.train.trackers)
    if not cfg.resume:
        _prepare_dir(run_dir, cfg.overwrite)
        return
    if not (run_dir / "config.yaml").is_file():
        raise UserError(f"--resume: {run_dir} is not an existing run; drop --resume to start it")
    saved = _flat(load_yaml(run_dir / "config.yaml").get("finetune") or {})
    for key, value in _flat(to_dict(cfg)).items():
        if key not in RESUME_FREE and saved.get(key, value) != value:
            raise UserError(f"--resume: {key} is {value!r} but {run_dir} was started with "
                            f"{saved[key]!r}; resume with the options it was started with")


def resume_from(cfg: Config, setup: Setup, run_dir: Path, batches: Iterator[Any], digest: str,
                console: Console) -> tuple[TrainState, dict[str, Any]]:
    """Weights, optimizer, RNG and data position from the run's latest checkpoint; (state,
    the checkpoint's info). A run stopped before its first save starts over."""
    ckpt = latest_checkpoint(run_dir) if cfg.resume else None
    if ckpt is None:
        return TrainState(), {}
    state, info = restore(setup, ckpt, digest)
    replay(batches, state.step, cfg.train.grad_accum)
    if setup.info.is_main:  # those steps will be logged again
        truncate_metrics(run_dir / "metrics.jsonl", state.step)
    console.print(f"resumed {run_dir} from {ckpt.name} (step {state.step})")
    return state, info


def interrupted(run_dir: Path) -> UserError:
    """The one-line error of a Ctrl-C: where the last checkpoint is, and how to go on."""
    last = latest_checkpoint(run_dir)
    where = f"the last checkpoint is {last.name}" if last else "no checkpoint was saved yet"
    return UserError(f"interrupted; {where}; continue with the same command and --resume")


def main(cfg: Config) -> int:
    """Fine-tune for the task; a Ctrl-C ends in one line that says how to resume."""
    info = init_distributed(cfg.dist.device)
    console = Console(quiet=not info.is_main)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    seed_everything(cfg.train.seed)
    try:
        task = classify_main if cfg.task == "classify" else chat_main
        return task(cfg, console, info)
    except KeyboardInterrupt:
        raise interrupted(Path(cfg.runs_dir) / cfg.out) from None
    finally:
        shutdown(info)


def _setup(cfg: Config, info: DistInfo, build: Callable[[], nn.Module],
           adapt_fn: Callable[[nn.Module], Any], weights: Any, tp_model: object | None) -> Setup:
    strategy = resolve_strategy(cfg.dist, info, "finetune", tp_model)
    return setup_training(build, info=info, strategy=strategy, train_cfg=cfg.train,
                          dist_cfg=cfg.dist, optim_cfg=cfg.optim,
                          generator=torch.Generator().manual_seed(cfg.train.seed),
                          weights=weights, adapt=adapt_fn)


def _finish(cfg: Config, setup: Setup, state: TrainState, build: Callable[[], nn.Module],
            run_dir: Path, info: dict[str, Any]) -> nn.Module | None:
    """After training: the whole trained model on rank 0 (None elsewhere); a sharded run's
    last checkpoint becomes the merged single file every command loads."""
    trained = gather_full(setup, build)
    if trained is not None and setup.sharded:
        save_final(run_dir, state, trained, info, cfg.train.keep_last)
    barrier(setup.info)
    return trained


def chat_main(cfg: Config, console: Console, dist: DistInfo) -> int:
    """Check the data, adapt the base, train through the one loop, write the run folder."""
    spec = read_run_spec(cfg.run)
    if spec.kind != "decoder":
        raise UserError(f"{spec.run_dir}: is a {spec.kind} run; --task chat fine-tunes a "
                        "decoder (for an encoder: --task classify)")
    tok = load_tokenizer(spec.tokenizer)
    template, eot = chat_setup(spec.run_dir, cfg.template, tok, spec.eos_id)
    max_len = min(cfg.max_len or spec.model_cfg.block_size, spec.model_cfg.block_size)
    report = checked_data(cfg, tok, template, eot, max_len)
    train_ex, val_ex = _split(report, max_len, cfg.val_fraction, cfg.train.seed)
    ranks = data_ranks(dist, 1)
    cfg = with_length(cfg, len(train_ex), ranks.world_size)
    pad_id = spec.eos_id if spec.eos_id is not None else 0
    batches = SftBatches(train_ex, cfg.train.batch_size, max_len, pad_id, cfg.train.seed,
                         cfg.pack, cfg.group_by_length, ranks.rank, ranks.world_size)
    build = functools.partial(Decoder, spec.model_cfg)
    adapted: list[str] = []
    adapt_fn = lambda m: adapted.__setitem__(slice(None), adapt(m, cfg.method, cfg.lora,  # noqa: E731
                                                               cfg.base_dtype))
    setup = _setup(cfg, dist, build, adapt_fn, checkpoint_weights(spec.checkpoint), None)
    val = eval_batches(val_ex, cfg.train.batch_size, pad_id)
    evaluate = (lambda m: lm_metrics(lm_loss(m, val)[0], None)) if val else None
    run_dir = Path(cfg.runs_dir) / cfg.out
    start_run_dir(cfg, run_dir, dist)  # every check passed: only now touch the disk
    digest = data_digest(cfg.data)
    state, done = resume_from(cfg, setup, run_dir, batches, digest, console)
    before = done["before"] if "before" in done else (evaluate(setup.model) if evaluate else {})
    nf4 = nf4_summary(setup.module)  # qlora: which NF4 implementation stores the base
    info = {"base_run": str(spec.run_dir.resolve()), "method": cfg.method,
            "lora": lora_info(cfg.lora), "adapted": adapted,
            **({"nf4_backend": nf4["backend"]} if nf4 else {})}
    base = LoadedModel(on_meta_decoder(build), tok, spec.run_dir, spec.checkpoint, spec.step,
                       spec.eos_id, spec.bos_id, list(spec.eos_ids))
    if dist.is_main:
        write_run_files(run_dir, base, template, {"finetune": to_dict(cfg)})
    meta = {"method": cfg.method, "before": before, "data_sha256": digest}

    def save(state: TrainState, metrics: dict[str, float]) -> None:
        save_resumable(run_dir, state, setup, {"metrics": metrics, **meta}, cfg.train.keep_last)
        if adapted and dist.is_main and not setup.sharded:
            save_adapter(run_dir, setup.module, info)

    total = sum(p.numel() for p in on_meta_decoder(build).parameters())
    trainable = sum(p.numel() for p in setup.module.parameters() if p.requires_grad)
    console.print(f"[bold]{cfg.out}[/]: {cfg.method} fine-tuning of {spec.run_dir}; "
                  f"{trainable:,} of {total:,} parameters train; {len(train_ex)} train / "
                  f"{len(val_ex)} val examples, {report.summary()['loss_fraction']:.0%} of "
                  f"tokens carry loss" + (f"; {setup.strategy} over {dist.world_size} processes"
                                          if dist.distributed else "") + _nf4_line(nf4))
    t0 = time.time()
    loss = packed_lm_loss if cfg.pack else causal_lm_loss  # packed x = (ids, segments)
    state = run_training(setup, batches, loss(cfg.train.label_smoothing), cfg.train, cfg.optim,
                         state, LoopHooks(evaluate, save), run_dir=run_dir, name=cfg.out,
                         console=console, config=to_dict(cfg),
                         flops_per_token=on_meta_decoder(build).flops_per_token(max_len))
    after = evaluate(setup.model) if evaluate else {}
    trained = _finish(cfg, setup, state, adapted_builder(build, adapt_fn), run_dir,
                      {"metrics": after, **meta})
    if trained is None:
        return 0
    if adapted and setup.sharded:
        save_adapter(run_dir, trained, info)
    plot_loss_curve(read_metrics(run_dir / "metrics.jsonl"), run_dir / "loss.png",
                    title=f"{cfg.out} ({cfg.method})")
    summary = {"run": cfg.out, "method": cfg.method, "base_run": info["base_run"],
               "trainable_params": trainable, "params": total, "steps": state.step,
               "tokens": state.tokens, "seconds": round(time.time() - t0, 1),
               "val_loss_before": before.get("val_loss"), "val_loss": after.get("val_loss"),
               "data": report.summary(), "model_bytes": storage_bytes(setup.module),
               **({"nf4": nf4} if nf4 else {})}
    atomic_write_json(run_dir / "summary.json", summary)
    console.print(f"val loss on reply tokens: {before.get('val_loss')} -> {after.get('val_loss')}")
    return 0


def _nf4_line(nf4: dict[str, Any]) -> str:
    """The console's note of how a QLoRA base is stored ('' for other methods)."""
    if not nf4:
        return ""
    how = "double quantization" if nf4["double_quant"] else "fp32 block maxima"
    return (f"; base in NF4 by {nf4['backend']} ({how}, {nf4['bits_per_weight']:.3f} bits per "
            f"weight over {nf4['matrices']} matrices)")


def on_meta_decoder(build: Callable[[], nn.Module]) -> Decoder:
    """The base decoder's skeleton: shapes, counts and FLOPs, no memory."""
    with torch.device("meta"):
        model = build()
    assert isinstance(model, Decoder)
    return model


# --------------------------------------------------------------------------- --task classify

def _classify_batches(items: Items, batch_size: int, pad: int, seed: int,
                      ranks: DistInfo) -> Iterator[tuple[tuple[Tensor, Tensor], Tensor]]:
    """Endless shuffled batches; each rank keeps its share of the same global batch."""
    gen = torch.Generator().manual_seed(seed)
    size = batch_size * ranks.world_size
    while True:
        order = torch.randperm(len(items), generator=gen).tolist()
        for k in range(0, len(order), size):
            rows = [items[i] for i in order[k: k + size]]
            if len(rows) >= ranks.world_size:
                yield classify_batch(rank_share(rows, ranks.rank, ranks.world_size), pad)


def _read_items(path: str, cfg: Config, tok: Tokenizer, names: list[str] | None,
                max_len: int) -> tuple[list[str], Items]:
    """(label names, encoded rows) of a {text, label} file; names=None takes the file's own."""
    texts, raw = read_labeled(path, cfg.text_field, cfg.label_field)
    names = names or sorted(set(raw))
    unknown = sorted(set(raw) - set(names))
    if unknown:
        raise UserError(f"{path}: label {unknown[0]!r} does not occur in --data {cfg.data} "
                        f"(labels {names})")
    return names, [(torch.tensor(classify_ids(tok, t, max_len)), names.index(r))
                   for t, r in zip(texts, raw)]


def _split_items(cfg: Config, items: Items) -> tuple[Items, Items]:
    """(train, val): --val_fraction of the rows, drawn with the seed, unless --val_data."""
    order = torch.randperm(len(items), generator=torch.Generator().manual_seed(cfg.train.seed))
    n_val = max(1, int(len(items) * cfg.val_fraction)) if cfg.val_fraction else 0
    return [items[i] for i in order[n_val:].tolist()], [items[i] for i in order[:n_val].tolist()]


def _classify_splits(cfg: Config, tok: Tokenizer, names: list[str],
                     max_len: int) -> tuple[Items, Items, Items]:
    """(train, val, test) encoded rows: val from --val_data or split off --data; test optional."""
    _, items = _read_items(cfg.data, cfg, tok, names, max_len)
    if cfg.val_data:
        train_items, val = items, _read_items(cfg.val_data, cfg, tok, names, max_len)[1]
    else:
        train_items, val = _split_items(cfg, items)
    test = _read_items(cfg.test_data, cfg, tok, names, max_len)[1] if cfg.test_data else []
    return train_items, val, test


def _prepare_classifier(model: EncoderForClassification, cfg: Config) -> None:
    """Freeze / wrap per --method; under LoRA the new head (classifier + pooler) still trains."""
    targets = cfg.lora.targets
    if cfg.method == "lora" and not any(n == t or n.endswith("." + t) for t in targets
                                        for n, _ in model.named_modules()):
        raise UserError(f"lora.targets {','.join(targets)}: the encoder has no such layer; "
                        "name its own (--lora.targets query,key,value,dense) or use --method full")
    adapt(model, cfg.method, cfg.lora)
    if cfg.method == "lora":
        for p in [*model.classifier.parameters(), *model.bert.pooler.parameters()]:
            p.requires_grad_(True)


def _write_classifier_files(cfg: Config, run_dir: Path, base_dir: Path,
                            model: EncoderForClassification, names: list[str],
                            max_len: int) -> None:
    """config.yaml (encoder, labels, max_len, options) and the base's tokenizer files."""
    saved = {"encoder": to_dict(model.cfg), "task": "classify", "labels": names,
             "max_len": max_len, "finetune": to_dict(cfg)}
    atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(saved, sort_keys=False))
    for name in (TOKENIZER_FILE, *SIDE_FILES):  # the base's own files, for `lmforge export`
        if (base_dir / name).is_file():
            atomic_write_bytes(run_dir / name, (base_dir / name).read_bytes())


def classify_main(cfg: Config, console: Console, dist: DistInfo) -> int:
    """Fine-tune an encoder with a classification head through the one loop."""
    if cfg.method == "qlora":
        raise ConfigError("method: --task classify supports full and lora (the new head must "
                          "train in full precision)")
    names = sorted(set(read_labeled(cfg.data, cfg.text_field, cfg.label_field)[1]))
    base, base_dir = load_classifier_base(cfg.run, len(names))  # encoders are small: whole
    tok = encoder_tokenizer(base_dir / TOKENIZER_FILE)
    max_len = min(cfg.max_len or base.cfg.block_size, base.cfg.block_size)
    train_items, val, test = _classify_splits(cfg, tok, names, max_len)
    ranks = data_ranks(dist, 1)
    cfg = with_length(cfg, len(train_items), ranks.world_size)
    pad, bs = tok.token_to_id(PAD_TOKEN), cfg.train.batch_size
    if pad is None:
        raise UserError("the encoder's tokenizer has no [PAD] token")
    # Metrics do not depend on the order: batches of rows of similar length carry less padding.
    val_b, test_b = ([classify_batch(rows[k: k + bs], pad) for k in range(0, len(rows), bs)]
                     for rows in (sorted(val, key=lambda r: len(r[0])),
                                  sorted(test, key=lambda r: len(r[0]))))
    evaluate = (lambda m: class_metrics(m, val_b, num_labels=len(names))) if val_b else None

    def scores(m: nn.Module) -> dict[str, float]:  # before and after: val and test
        return {**(evaluate(m) if evaluate else {}),
                **(class_metrics(m, test_b, "test", num_labels=len(names)) if test_b else {})}

    total = sum(p.numel() for p in base.parameters())
    build = functools.partial(EncoderForClassification, base.cfg)
    setup = _setup(cfg, dist, build, lambda m: _prepare_classifier(m, cfg), base.state_dict(),
                   None)
    del base
    batches = _classify_batches(train_items, bs, pad, cfg.train.seed, ranks)
    run_dir = Path(cfg.runs_dir) / cfg.out
    start_run_dir(cfg, run_dir, dist)  # every check passed: only now touch the disk
    digest = data_digest(cfg.data, cfg.val_data, cfg.test_data)
    state, done = resume_from(cfg, setup, run_dir, batches, digest, console)
    before = done["before"] if "before" in done else scores(setup.model)  # the untrained head
    if dist.is_main:
        _write_classifier_files(cfg, run_dir, base_dir, setup.module, names, max_len)
    meta = {"before": before, "data_sha256": digest}

    def save(state: TrainState, metrics: dict[str, float]) -> None:
        save_resumable(run_dir, state, setup, {"metrics": metrics, **meta}, cfg.train.keep_last)

    trainable = sum(p.numel() for p in setup.module.parameters() if p.requires_grad)
    console.print(f"[bold]{cfg.out}[/]: {cfg.method} classification fine-tuning of {cfg.run}; "
                  f"{trainable:,} of {total:,} parameters train; labels {names}; "
                  f"{len(train_items)} train / {len(val)} val / {len(test)} test rows, "
                  f"max_len {max_len}")
    t0 = time.time()
    state = run_training(setup, batches, token_loss(), cfg.train, cfg.optim, state,
                         LoopHooks(evaluate, save), run_dir=run_dir, name=cfg.out,
                         console=console, config=to_dict(cfg))
    after = scores(setup.model)
    trained = _finish(cfg, setup, state, adapted_builder(build, lambda m: _prepare_classifier(
        m, cfg)), run_dir, {"metrics": after, **meta})
    if trained is None:
        return 0
    plot_loss_curve(read_metrics(run_dir / "metrics.jsonl"), run_dir / "loss.png",
                    title=f"{cfg.out} (classify, {cfg.method})")
    atomic_write_json(run_dir / "summary.json", {
        "run": cfg.out, "task": "classify", "method": cfg.method, "labels": names,
        "steps": state.step, "seconds": round(time.time() - t0, 1), "max_len": max_len,
        "trainable_params": trainable, "params": total, "train_examples": len(train_items),
        "val_examples": len(val), "test_examples": len(test),
        **{f"{k}_before": v for k, v in before.items()}, **after})
    for split in ("val", "test"):
        if f"{split}_accuracy" in after:
            console.print(f"{split} accuracy {before.get(f'{split}_accuracy', float('nan')):.4f}"
                          f" -> {after[f'{split}_accuracy']:.4f}, macro-F1 "
                          f"{before.get(f'{split}_macro_f1', float('nan')):.4f} -> "
                          f"{after[f'{split}_macro_f1']:.4f}")
    return 0

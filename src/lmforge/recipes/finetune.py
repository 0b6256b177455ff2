"""Fine-tune a decoder run on chat data: full, LoRA or QLoRA, through the one training loop.

Reads prompt/completion, `messages` or ShareGPT `conversations` JSONL, renders every row with
the base run's chat template (else ChatML) and trains on the assistant tokens and each reply's
end-of-turn token only. The checks of `lmforge data check` run first: a file that would train
no reply token or no end-of-turn token is refused before anything is written. The new run
folder loads like any other (`lmforge generate`, `chat`, `eval`): its checkpoint holds the
merged weights; LoRA/QLoRA runs also keep adapter.safetensors + adapter.json (`lmforge merge`).

--task classify fine-tunes an encoder run instead, with a new classification head on
{text, label} rows, and reports val accuracy.
"""

from __future__ import annotations

import copy
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from rich.console import Console
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from tokenizers import Tokenizer
from torch import Tensor, nn

from lmforge.checkpoint import TrainState, save_checkpoint
from lmforge.config import (
    ConfigError,
    OptimConfig,
    TrainConfig,
    UserError,
    from_dict,
    load_yaml,
    to_dict,
)
from lmforge.data.check import CheckReport, check_sft, refusals
from lmforge.data.mlm import CLS_TOKEN, PAD_TOKEN, SEP_TOKEN
from lmforge.data.sft import SftBatches, eval_batches, read_labeled, to_example
from lmforge.data.tokenizer import load_tokenizer
from lmforge.eval.lm import lm_loss, lm_metrics
from lmforge.infer.chat import BUILTIN, ChatTemplate, load_chat_template
from lmforge.models.encoder import EncoderConfig, EncoderForClassification
from lmforge.models.lora import (
    LoraConfig,
    LoRALinear,
    adapter_state_dict,
    apply_lora,
    lora_info,
    merge_lora,
)
from lmforge.models.quant import NF4Linear, dequantize_nf4, quantize_nf4
from lmforge.recipes.common import LoadedModel, find_run_dir, load_model
from lmforge.train.loop import LoopHooks, causal_lm_loss, train
from lmforge.train.optim import build_optimizer
from lmforge.utils.io import atomic_write_bytes, atomic_write_json, atomic_write_text
from lmforge.utils.logging import RunLogger, read_metrics
from lmforge.utils.plot import plot_loss_curve
from lmforge.utils.seed import seed_everything

Method = Literal["full", "lora", "qlora"]
ADAPTER_FILE, ADAPTER_INFO = "adapter.safetensors", "adapter.json"
SIDE_FILES = ("tokenizer_config.json", "special_tokens_map.json")
EXAMPLES = """
lmforge finetune --run shakespeare --data chat.jsonl --method lora --out chat-lora
lmforge finetune --run smollm2 --data qa.jsonl --method qlora --lora.rank 16 --out qa
lmforge finetune --run shakespeare --data pc.jsonl --method full --train.max_steps 300 --out pc
lmforge finetune --task classify --run runs/bert --data reviews.jsonl --method full --out senti
"""


@dataclass
class Config:
    """Options of `lmforge finetune`."""

    run: str = "runs/shakespeare"
    """The base: a decoder run folder (pretrained or imported) or one of its checkpoints."""
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
    """Pack examples back to back into rows of max_len tokens (no padding; attention crosses examples)."""
    group_by_length: bool = False
    """Batch examples of similar length together (less padding)."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """Adapters of --method lora/qlora."""
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=2e-4, warmup_steps=10,
                                                                   weight_decay=0.0))
    """Optimizer and schedule (fine-tuning defaults: lr 2e-4, 10 warmup steps, no decay)."""
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        max_steps=100, batch_size=8, eval_every=50, save_every=100, trackers=[]))
    """Training loop."""
    overwrite: bool = False
    """Delete an existing run of the same name and start over."""

    def __post_init__(self) -> None:
        if not self.out or "/" in self.out or self.out.startswith("."):
            raise ConfigError(f"out: '{self.out}' is not a valid run name (no '/', not hidden)")
        if not 0 <= self.val_fraction < 1:
            raise ConfigError(f"val_fraction: must be in [0, 1), got {self.val_fraction}")
        if self.max_len is not None and self.max_len < 2:
            raise ConfigError(f"max_len: must be >= 2, got {self.max_len}")


def chat_setup(run_dir: Path, name: str | None, tok: Tokenizer,
               eos_id: int | None) -> tuple[ChatTemplate, str]:
    """The chat template (named, the run's own, else ChatML) and its end-of-turn string."""
    eos = tok.id_to_token(eos_id) if eos_id is not None else ""
    try:
        template = load_chat_template(run_dir, name, eos or "")
    except UserError as e:
        if name or "has no chat template" not in str(e):
            raise  # a broken template file is the user's to fix, not to paper over
        template = load_chat_template(run_dir, "chatml", eos or "")
    # A built-in saved as chat_template.jinja (by finetune) keeps the built-in's end of turn.
    stops = template.stop or next((stop for src, stop in BUILTIN.values()
                                   if src == template.source), ())
    end_of_turn = stops[0] if stops else template.eos_token
    if not end_of_turn:
        raise UserError(f"chat template {template.origin}: no end-of-turn string is known (no "
                        "stop string, no eos_token); use --template chatml")
    return template, end_of_turn


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


def prepare_model(model: nn.Module, cfg: Config) -> list[str]:
    """Make the right parameters trainable for the method; return the adapted layer names."""
    if cfg.method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return []
    if cfg.method == "qlora":
        quantize_nf4(model)  # the frozen base is stored in 4 bits; adapters stay fp32
    lc = cfg.lora
    return apply_lora(model, lc.rank, lc.alpha, lc.dropout, lc.targets)


def plain_copy(model: nn.Module) -> nn.Module:
    """The weights a run folder holds: a merged, dequantized copy of a (Q)LoRA model, else it."""
    if not any(isinstance(m, (LoRALinear, NF4Linear)) for m in model.modules()):
        return model
    return dequantize_nf4(merge_lora(copy.deepcopy(model)))


def write_run_files(run_dir: Path, loaded: LoadedModel, template: ChatTemplate,
                    extra: dict[str, Any]) -> None:
    """config.yaml (model + eos_id + how it was made), tokenizer, chat template, side files."""
    saved = {"model": to_dict(loaded.model.cfg), "eos_id": loaded.eos_id, **extra}
    atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(saved, sort_keys=False))
    atomic_write_text(run_dir / "tokenizer.json", loaded.tokenizer.to_str())  # type: ignore[attr-defined]
    atomic_write_text(run_dir / "chat_template.jinja", template.source)
    for name in SIDE_FILES:
        if (loaded.run_dir / name).is_file():
            atomic_write_bytes(run_dir / name, (loaded.run_dir / name).read_bytes())


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


def _prepare_dir(run_dir: Path, overwrite: bool) -> None:
    if run_dir.exists():
        if not overwrite:
            raise UserError(f"{run_dir} exists; pass --overwrite to replace it or pick another --out")
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)


def main(cfg: Config) -> int:
    """Check the data, adapt the model, train through the one loop, write the run folder."""
    console = Console()
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    seed_everything(cfg.train.seed)
    if cfg.task == "classify":
        return classify_main(cfg, console)
    loaded = load_model(cfg.run)
    tok = loaded.tokenizer
    template, eot = chat_setup(loaded.run_dir, cfg.template, tok, loaded.eos_id)  # type: ignore[arg-type]
    max_len = min(cfg.max_len or loaded.model.cfg.block_size, loaded.model.cfg.block_size)
    report = checked_data(cfg, tok, template, eot, max_len)  # type: ignore[arg-type]
    train_ex, val_ex = _split(report, max_len, cfg.val_fraction, cfg.train.seed)
    pad_id = loaded.eos_id if loaded.eos_id is not None else 0
    batches = SftBatches(train_ex, cfg.train.batch_size, max_len, pad_id, cfg.train.seed,
                         cfg.pack, cfg.group_by_length)
    model = loaded.model
    total = sum(p.numel() for p in model.parameters())  # before adapters and NF4
    adapted = prepare_model(model, cfg)
    optimizer = build_optimizer(model, cfg.optim)
    val = eval_batches(val_ex, cfg.train.batch_size, pad_id)
    evaluate = (lambda m: lm_metrics(lm_loss(m, val)[0], None)) if val else None
    before = evaluate(model) if evaluate else {}
    run_dir = Path(cfg.runs_dir) / cfg.out
    _prepare_dir(run_dir, cfg.overwrite)  # every check passed: only now touch the disk
    info = {"base_run": str(loaded.run_dir.resolve()), "method": cfg.method,
            "lora": lora_info(cfg.lora), "adapted": adapted}
    write_run_files(run_dir, loaded, template, {"finetune": to_dict(cfg)})

    def save(state: TrainState, metrics: dict[str, float]) -> None:
        save_checkpoint(run_dir, state, plain_copy(model), None, info={"metrics": metrics,
                        "method": cfg.method}, keep_last=cfg.train.keep_last, is_best=False)
        if adapted:
            save_adapter(run_dir, model, info)

    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    console.print(f"[bold]{cfg.out}[/]: {cfg.method} fine-tuning of {loaded.run_dir}; "
                  f"{trainable:,} of {total:,} parameters train; {len(train_ex)} train / "
                  f"{len(val_ex)} val examples, {report.summary()['loss_fraction']:.0%} of "
                  f"tokens carry loss")
    t0 = time.time()
    with RunLogger(run_dir / "metrics.jsonl", cfg.train.max_steps, console) as log:
        state = train(model, optimizer, batches, causal_lm_loss(cfg.train.label_smoothing),
                      cfg.train, cfg.optim, TrainState(), log, LoopHooks(evaluate, save))
    plot_loss_curve(read_metrics(run_dir / "metrics.jsonl"), run_dir / "loss.png",
                    title=f"{cfg.out} ({cfg.method})")
    after = evaluate(model) if evaluate else {}
    summary = {"run": cfg.out, "method": cfg.method, "base_run": info["base_run"],
               "trainable_params": trainable, "params": total, "steps": state.step,
               "tokens": state.tokens, "seconds": round(time.time() - t0, 1),
               "val_loss_before": before.get("val_loss"), "val_loss": after.get("val_loss"),
               "data": report.summary()}
    atomic_write_json(run_dir / "summary.json", summary)
    console.print(f"val loss on reply tokens: {before.get('val_loss')} -> {after.get('val_loss')}")
    return 0


# --------------------------------------------------------------------------- --task classify


def load_encoder_classifier(cfg: Config, num_labels: int) -> tuple[EncoderForClassification, Path]:
    """An encoder run's body under a fresh classification head; (model, run dir)."""
    run_dir, ckpt = find_run_dir(Path(cfg.run))
    saved = load_yaml(run_dir / "config.yaml")
    if not isinstance(saved.get("encoder"), dict):
        raise UserError(f"{run_dir}: --task classify needs an encoder run "
                        "(`lmforge pretrain --objective mlm`)")
    ecfg = from_dict(EncoderConfig, {**saved["encoder"], "num_labels": num_labels}, "encoder")
    model = EncoderForClassification(ecfg)
    body = {k: v for k, v in load_file(ckpt / "model.safetensors").items()
            if k.startswith("bert.")}
    missing, unexpected = model.load_state_dict(body, strict=False)
    # The pooler and the classifier are new (an MLM run has neither); anything else must load.
    lost = [k for k in missing if not k.startswith(("bert.pooler.", "classifier."))]
    if lost or unexpected:
        raise UserError(f"{ckpt}: does not fit the encoder config (missing {lost[:3]}, "
                        f"unexpected {list(unexpected)[:3]})")
    return model, run_dir


def _classify_examples(tok: Tokenizer, texts: list[str], labels: list[int],
                       max_len: int) -> list[tuple[Tensor, int]]:
    ids = [tok.token_to_id(t) for t in (CLS_TOKEN, SEP_TOKEN, PAD_TOKEN)]
    if None in ids:
        raise UserError("the encoder run's tokenizer lacks [CLS], [SEP] or [PAD]")
    cls, sep, _ = ids
    return [(torch.tensor([cls, *tok.encode(t).ids[: max_len - 2], sep]), y)
            for t, y in zip(texts, labels)]


def _classify_batch(items: list[tuple[Tensor, int]], pad: int) -> tuple[tuple[Tensor, Tensor], Tensor]:
    width = max(len(x) for x, _ in items)
    ids = torch.full((len(items), width), pad, dtype=torch.long)
    for i, (x, _) in enumerate(items):
        ids[i, : len(x)] = x
    mask = torch.zeros_like(ids)
    for i, (x, _) in enumerate(items):
        mask[i, : len(x)] = 1
    return (ids, mask), torch.tensor([y for _, y in items])


def _classify_batches(items: list[tuple[Tensor, int]], batch_size: int, pad: int,
                      seed: int) -> Iterator[tuple[tuple[Tensor, Tensor], Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(items), generator=gen).tolist()
        for k in range(0, len(order), batch_size):
            yield _classify_batch([items[i] for i in order[k: k + batch_size]], pad)


def _class_loss(model: nn.Module, x: tuple[Tensor, Tensor], y: Tensor) -> Tensor:
    return nn.functional.cross_entropy(model(*x), y)


@torch.no_grad()
def class_metrics(model: nn.Module, batches: list) -> dict[str, float]:
    """Mean cross-entropy and accuracy over fixed batches."""
    was = model.training
    model.eval()
    loss, correct, n = 0.0, 0, 0
    for x, y in batches:
        logits = model(*x)  # (B, num_labels)
        loss += float(nn.functional.cross_entropy(logits, y, reduction="sum"))
        correct += int((logits.argmax(-1) == y).sum())
        n += len(y)
    model.train(was)
    return {"val_loss": loss / n, "val_accuracy": correct / n}


def classify_main(cfg: Config, console: Console) -> int:
    """Fine-tune an encoder with a classification head through the one loop."""
    if cfg.method == "qlora":
        raise ConfigError("method: --task classify supports full and lora (the new head must "
                          "train in full precision)")
    texts, raw = read_labeled(cfg.data, cfg.text_field, cfg.label_field)
    names = sorted(set(raw))
    model, base_dir = load_encoder_classifier(cfg, len(names))
    tok = load_tokenizer(base_dir / "tokenizer.json")
    max_len = min(cfg.max_len or model.cfg.block_size, model.cfg.block_size)
    items = _classify_examples(tok, texts, [names.index(r) for r in raw], max_len)
    order = torch.randperm(len(items), generator=torch.Generator().manual_seed(cfg.train.seed))
    n_val = max(1, int(len(items) * cfg.val_fraction)) if cfg.val_fraction else 0
    val = [items[i] for i in order[:n_val].tolist()]
    train_items = [items[i] for i in order[n_val:].tolist()]
    pad = tok.token_to_id(PAD_TOKEN)
    val_b = [_classify_batch(val[k: k + cfg.train.batch_size], pad)
             for k in range(0, len(val), cfg.train.batch_size)]
    evaluate = (lambda m: class_metrics(m, val_b)) if val_b else None
    prepare_model(model, cfg)
    if cfg.method == "lora":
        for p in [*model.classifier.parameters(), *model.bert.pooler.parameters()]:
            p.requires_grad_(True)  # the new head always trains
    before = evaluate(model) if evaluate else {}
    run_dir = Path(cfg.runs_dir) / cfg.out
    _prepare_dir(run_dir, cfg.overwrite)
    saved = {"encoder": to_dict(model.cfg), "task": "classify", "labels": names,
             "finetune": to_dict(cfg)}
    atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(saved, sort_keys=False))
    atomic_write_text(run_dir / "tokenizer.json", tok.to_str())

    def save(state: TrainState, metrics: dict[str, float]) -> None:
        save_checkpoint(run_dir, state, plain_copy(model), None, info={"metrics": metrics},
                        keep_last=cfg.train.keep_last, is_best=False)

    with RunLogger(run_dir / "metrics.jsonl", cfg.train.max_steps, console) as log:
        state = train(model, build_optimizer(model, cfg.optim),
                      _classify_batches(train_items, cfg.train.batch_size, pad, cfg.train.seed),
                      _class_loss, cfg.train, cfg.optim, TrainState(), log,
                      LoopHooks(evaluate, save))
    after = evaluate(model) if evaluate else {}
    atomic_write_json(run_dir / "summary.json", {
        "run": cfg.out, "task": "classify", "method": cfg.method, "labels": names,
        "steps": state.step, "train_examples": len(train_items), "val_examples": len(val),
        "val_accuracy_before": before.get("val_accuracy"),
        "val_accuracy": after.get("val_accuracy"), "val_loss": after.get("val_loss")})
    console.print(f"val accuracy: {before.get('val_accuracy')} -> {after.get('val_accuracy')}")
    return 0

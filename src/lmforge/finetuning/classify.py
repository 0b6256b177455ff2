"""--task classify: an encoder with a new classification head on {text, label} rows."""

from __future__ import annotations

import functools
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import yaml
from rich.console import Console
from tokenizers import Tokenizer
from torch import Tensor, nn

from lmforge.checkpoint import TrainState
from lmforge.config import (
    ConfigError,
    UserError,
    to_dict,
)
from lmforge.data.classify import Items, classify_batch, classify_ids, encoder_tokenizer
from lmforge.data.mlm import PAD_TOKEN
from lmforge.data.sft import rank_share, read_labeled
from lmforge.eval.classify import class_metrics
from lmforge.finetuning.common import (
    finish_run,
    resume_from,
    setup_run,
    start_run_dir,
    with_length,
)
from lmforge.finetuning.options import Config
from lmforge.interop.hf import TOKENIZER_FILE
from lmforge.models.encoder import EncoderForClassification
from lmforge.run import (
    SIDE_FILES,
    load_classifier_base,
)
from lmforge.train.finetune import (
    adapt,
    adapted_builder,
    data_digest,
    save_resumable,
)
from lmforge.train.loop import LoopHooks
from lmforge.train.losses import token_loss
from lmforge.train.session import run_training
from lmforge.train.setup import (
    data_ranks,
)
from lmforge.utils.dist import DistInfo
from lmforge.utils.io import atomic_write_bytes, atomic_write_json, atomic_write_text
from lmforge.utils.logging import read_metrics
from lmforge.utils.plot import plot_loss_curve


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
    setup = setup_run(cfg, dist, build, lambda m: _prepare_classifier(m, cfg),
                      base.state_dict(), None)
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
    trained = finish_run(cfg, setup, state,
                         adapted_builder(build, lambda m: _prepare_classifier(m, cfg)), run_dir,
                         {"metrics": after, **meta})
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

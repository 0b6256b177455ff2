"""Pretrain a model from scratch: a decoder (clm), an encoder (mlm) or an encoder-decoder (seq2seq).

Builds the model from a named preset (overridable field by field with --model.* for decoders,
--encoder.* for encoders, --seq2seq.* for encoder-decoders), trains it with AdamW +
warmup/cosine through the one training loop, evaluates on held-out data, saves checkpoints,
metrics.jsonl and a loss-curve PNG under runs/<run>/, and ends with a report.

--objective clm (default): next-token prediction on a prepared dataset (`lmforge data prepare`);
val loss / perplexity / bits per byte, then samples. mlm: BERT's masked-token prediction on
the same kind of dataset; the tokenizer gains [PAD] [CLS] [SEP] [MASK] if it lacks them (new ids
after the existing ones, so the prepared shards stay valid); val loss and accuracy on masked
tokens with fixed masks. seq2seq: teacher-forced source -> target on a pairs folder
(`lmforge data synth`); val loss, token accuracy and greedy exact match on held-out pairs.
"""

from __future__ import annotations

from lmforge.pretraining.main import main
from lmforge.pretraining.options import Config, resolve

__all__ = ["DEFAULTS_NOTE", "EXAMPLES", "Config", "main", "resolve"]

EXAMPLES = """
lmforge pretrain --data data/shakespeare --run shakespeare
lmforge pretrain --data data/shakespeare --run small --preset llama-1m --train.max_steps 500
lmforge pretrain --run shakespeare --resume            # continue from the latest checkpoint
lmforge pretrain --config runs/shakespeare/config.yaml --run again   # reproduce a run
lmforge pretrain --objective mlm --preset bert-mini --data data/shakespeare --run bert
lmforge data synth --task reverse --out data/reverse
lmforge pretrain --objective seq2seq --data data/reverse --run reverse
"""

DEFAULTS_NOTE = {"model": "from --preset", "encoder": "from --preset", "seq2seq": "from --preset"}



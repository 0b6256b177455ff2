"""Evaluate a run: perplexity, greedy generations, classification, lm_eval tasks, memorization.

A `.txt` file, or JSONL rows with a "text" field, gives loss and perplexity over all tokens.
JSONL chat rows ({prompt, completion}, {messages}, {conversations}) give loss and perplexity
on the reply tokens (rendered with the run's chat template, as in training), then each prompt
(the conversation up to its last reply) is answered greedily and scored against that reply:
exact match, token Jaccard, ROUGE-1/2/L (rouge-score) and BLEU (sacrebleu). `--baseline RUN2`
evaluates a second run the same way and prints both side by side. A classifier run
(`finetune --task classify`) on {text, label} rows gives loss, accuracy and macro-F1. Results are
saved as eval_<data name>.json in the run folder. `--shots K` puts K solved rows (of
`--shots_file`, else the other rows of --data; drawn with --seed) before each chat question.

`--harness TASKS` runs lm-evaluation-harness tasks (MMLU, HellaSwag, ARC, ... or your own YAMLs
in --harness_include) on the run instead, through lmforge's model adapter (eval_harness.json).
`--memorization` samples windows of the run's training data, prompts with the first
--mem_prefix tokens and reports the fraction whose next --mem_suffix tokens the model
reproduces verbatim, greedily (eval_memorization.json).
"""

from __future__ import annotations

from lmforge.evaluation.main import main
from lmforge.evaluation.options import Config

__all__ = ["EXAMPLES", "POSITIONAL", "Config", "main"]


EXAMPLES = """
lmforge eval --run runs/chat-lora --data test.jsonl --baseline runs/shakespeare
lmforge eval --run runs/shakespeare --data notes.txt
lmforge eval --run runs/minilm-vader --data data/vader/test.jsonl   # a classifier
lmforge eval --run runs/chat-lora --data test.jsonl --shots 3 --shots_file train.jsonl
lmforge eval runs/smol --harness lmforge_mc --harness_include tests/data/harness
lmforge eval runs/smol --harness mmlu,hellaswag,arc_easy --shots 5 --limit 100   # online
lmforge eval runs/shakespeare --memorization
"""

POSITIONAL = ("run",)



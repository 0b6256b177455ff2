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

--task dpo (and ipo, orpo, simpo) trains on {prompt, chosen, rejected} preference pairs: the
same run with another batch and loss. DPO/IPO's reference is the frozen base — with LoRA the
same model with its adapters off, with --method full log-probs computed once before training.
Logged: loss, reward margin and accuracy, the replies' log-probs; held-out pairs before/after.

--resume continues an interrupted run from its latest checkpoint (weights, optimizer, RNG and
data position), so it ends bit-identical to a run that was never stopped.
"""

from __future__ import annotations

from lmforge.finetuning.main import main
from lmforge.finetuning.options import Config

__all__ = ["EXAMPLES", "Config", "main"]

EXAMPLES = """
lmforge finetune --run shakespeare --data chat.jsonl --method lora --out chat-lora
lmforge finetune --run smollm2 --data qa.jsonl --method qlora --lora.rank 16 --out qa
lmforge finetune --run shakespeare --data pc.jsonl --method full --train.max_steps 300 --out pc
lmforge finetune --task dpo --run smollm2 --data pairs.jsonl --out dpo   # LoRA, beta 0.1
lmforge finetune --task classify --run runs/bert --data reviews.jsonl --method full --out senti
lmforge finetune --run smollm2 --data qa.jsonl --out qa --resume   # continue after a stop
torchrun --nproc_per_node 2 -m lmforge.cli finetune --run smollm2 --data qa.jsonl --out qa \\
    --dist.strategy fsdp                      # LoRA over a base sharded across 2 processes
"""

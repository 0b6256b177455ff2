"""Export a run's model: a Hugging Face folder, a llama.cpp GGUF file or an ONNX graph.

`--format hf` writes model.safetensors (or shards), config.json (LlamaForCausalLM,
Qwen2ForCausalLM, Qwen3ForCausalLM, MistralForCausalLM, Phi3ForCausalLM or GPT2LMHeadModel,
whichever computes exactly what the run's model does), generation_config.json and the
tokenizer files, then loads them back with transformers. An
encoder run (`pretrain --objective mlm`, `finetune --task classify`) exports as
BertForMaskedLM / BertForSequenceClassification, an encoder-decoder run (`pretrain --objective
seq2seq`) as MarianMTModel (post-norm) or PegasusForConditionalGeneration (pre-norm) (hf only).
`--format gguf` writes one .gguf file (llama.cpp's llama, qwen2, qwen3 or gpt2 architecture,
--gguf_type f32, f16, bf16, q8_0, q4_0, or the K-quants q4_k_m, q5_k_m, q6_k made by llama.cpp's
quantizer, with the tokenizer, chat template and an imported model's own metadata) and an
Ollama Modelfile, then reads it back with the gguf package and lmforge's GGUF import;
`--out NAME.gguf` writes only that file. `--format onnx` writes model.onnx (dynamic batch and
sequence; --kv_cache adds past/present key-value inputs/outputs) and the tokenizer, then runs
it in onnxruntime. Every export gets a model card (README.md) and ends with that load-back
check: the same tokens through both models in fp32, the max |Δlogits| printed, and beyond
--tolerance an error with nothing left behind.
"""

from __future__ import annotations

from rich.console import Console

from lmforge.export import ExportConfig, export_run

EXAMPLES = """
lmforge export --run runs/shakespeare --format hf --out exports/shakespeare-hf
lmforge export --run runs/smollm2 --out exports/smollm2 --dtype bfloat16
lmforge export --run runs/reverse --format hf --out exports/reverse-marian
lmforge export --run runs/shakespeare --format gguf --gguf_type q8_0 --out exports/shakespeare-gguf
lmforge export --run runs/smollm2 --format gguf --gguf_type q5_k_m --out smollm2.Q5_K_M.gguf
lmforge export --run runs/shakespeare --format onnx --kv_cache --out exports/shakespeare-onnx
"""

Config = ExportConfig  # the options live with the library, which push shares


def main(cfg: Config) -> int:
    """Export the run as --format into --out."""
    console = Console(highlight=False)
    ckpt = export_run(cfg, console)
    console.print(f"exported {ckpt} as {cfg.format} -> {cfg.out}", markup=False,
                  soft_wrap=True)
    return 0

"""Model formats in and out: Hugging Face folders (``hf``).

The only package that imports transformers (and, later, gguf/onnx), always inside functions,
so importing it costs nothing more than the decoder and safetensors.
"""

"""llama.cpp's own K-quant quantizer, through ``llama-cpp-python`` (the one importer of it).

K-quants (Q4_K_M, Q5_K_M, Q6_K) are what people deploy to Ollama; their "_M" mixes give some
tensors more bits (llama.cpp's ``llama_model_quantize`` decides which, by tensor and layer), so
they come from llama.cpp itself rather than from a copy of its rules: lmforge writes an F32
GGUF and asks llama.cpp to quantize it, as ``llama-quantize model.F32.gguf out.gguf Q5_K_M``.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lmforge.config import UserError

INSTALL = ("pip install llama-cpp-python (or pip install 'lmforge[llamacpp]'; it compiles "
           "llama.cpp, ~10 min on 2 cores)")
# --gguf_type -> llama.cpp's llama_ftype name (llama.h)
K_QUANTS = {"q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M", "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
            "q6_k": "LLAMA_FTYPE_MOSTLY_Q6_K"}


def llama_cpp() -> Any:
    """The ``llama_cpp`` package, or a UserError that names it and how to install it."""
    try:
        import llama_cpp as lib
    except ImportError:
        raise UserError(f"K-quant GGUF types are made by llama.cpp's quantizer, which needs the "
                        f"llama-cpp-python package; {INSTALL}") from None
    return lib


def quantize(src: Path, dst: Path, gguf_type: str, threads: int | None = None) -> None:
    """Quantize the F32/F16 GGUF ``src`` into ``dst`` as ``gguf_type`` with llama.cpp."""
    lib = llama_cpp()
    params = lib.llama_model_quantize_default_params()
    params.ftype = getattr(lib, K_QUANTS[gguf_type])
    params.nthread = threads or max(1, len(os.sched_getaffinity(0)))
    with quiet(lib):
        rc = lib.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        raise UserError(f"{dst}: llama.cpp's quantizer failed (code {rc}) on {src.name}")


@contextmanager
def quiet(lib: Any) -> Iterator[None]:
    """Route llama.cpp's log (a line per tensor) to nowhere while the block runs."""
    callback = lib.llama_log_callback(lambda level, text, user_data: None)  # kept alive here
    lib.llama_log_set(callback, ctypes.c_void_p(0))
    try:
        yield
    finally:  # llama-cpp-python's own logger again (it honours Llama(verbose=...))
        lib.llama_log_set(lib._logger.llama_log_callback, ctypes.c_void_p(0))

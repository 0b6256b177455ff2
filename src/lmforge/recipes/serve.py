"""Serve a run over an OpenAI-compatible HTTP API, with continuous batching.

/v1/completions and /v1/chat/completions (streaming or not), /v1/models, /health and
/metrics (Prometheus). Requests join the running batch between decode steps (up to
--max_batch at once; up to --max_queue more wait, beyond that: HTTP 429). Binds 127.0.0.1
unless told otherwise; --api_key makes every /v1 call need "Authorization: Bearer KEY". One
JSON line per request goes to stderr. --draft RUN (a smaller run with the same tokenizer)
decodes speculatively: the same greedy text, the same sampling distribution, fewer forwards of
the big model. Needs: pip install 'lmforge[serve]'.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import sys
from dataclasses import dataclass, field

from lmforge.config import ConfigError, UserError
from lmforge.infer.chat import ChatTemplate, resolve_chat_template
from lmforge.infer.engine import Engine
from lmforge.infer.speculative import check_draft_tokenizer
from lmforge.run import LoadedModel, Placement, load_model

EXAMPLES = """
lmforge serve --run runs/shakespeare
lmforge serve --run runs/smollm2 --template chatml --max_batch 16 --port 8080
lmforge serve --run runs/big --draft runs/small --draft_tokens 4
LMFORGE_API_KEY=secret lmforge serve --run runs/shakespeare --host 0.0.0.0 --rate_limit 60/min
"""
_WINDOWS = {"s": 1.0, "sec": 1.0, "second": 1.0, "min": 60.0, "minute": 60.0, "h": 3600.0,
            "hour": 3600.0}


@dataclass
class Config(Placement):
    """Options of `lmforge serve`."""

    run: str = "runs/shakespeare"
    """A run folder (uses its latest checkpoint) or one checkpoint folder."""
    host: str = "127.0.0.1"
    """Address to bind; 0.0.0.0 exposes the server to the network (set an API key then)."""
    port: int = 8000
    """TCP port to listen on."""
    model_name: str | None = None
    """The name clients pass as `model`; null = the run folder's name."""
    api_key: list[str] = field(default_factory=list)
    """Accepted Bearer keys (comma-separated); empty = the LMFORGE_API_KEY variable, else none needed."""
    rate_limit: str | None = None
    """Requests allowed per key (per client address without keys), e.g. 60/min or 5/s; null = no limit."""
    max_batch: int = 8
    """Requests decoded together (slots of the preallocated KV cache)."""
    max_queue: int = 64
    """Requests that may wait for a slot; one more gets HTTP 429."""
    max_len: int | None = None
    """Positions per slot (prompt + answer); null = the model's context. The KV cache of all slots is preallocated: lower this for long-context models."""
    template: str | None = None
    """Chat template: chatml or a .jinja file; null = the run folder's own (chat is refused without one)."""
    draft: str | None = None
    """A smaller run with the same tokenizer that proposes tokens for every running request (speculative decoding: the same greedy text, the same sampling distribution; requests with penalties are refused); null = none."""
    draft_tokens: int = 4
    """Tokens the draft proposes per request and step (with --draft)."""

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise ConfigError(f"port: must be in 1..65535, got {self.port}")
        if self.max_batch < 1:
            raise ConfigError(f"max_batch: must be >= 1, got {self.max_batch}")
        if self.max_len is not None and self.max_len < 2:
            raise ConfigError(f"max_len: must be >= 2 (a prompt token and an answer), got "
                              f"{self.max_len}")
        if self.max_queue < 0:
            raise ConfigError(f"max_queue: must be >= 0, got {self.max_queue}")
        if self.draft_tokens < 1:
            raise ConfigError(f"draft_tokens: must be >= 1, got {self.draft_tokens}")
        if self.rate_limit is not None:
            parse_rate(self.rate_limit)


def parse_rate(text: str) -> tuple[int, float]:
    """'60/min' -> (60, 60.0): requests and the window in seconds."""
    m = re.fullmatch(r"\s*(\d+)\s*/\s*([a-z]+)\s*", text)
    if not m or m.group(2) not in _WINDOWS or int(m.group(1)) < 1:
        raise ConfigError(f"rate_limit: expected N/s, N/min or N/hour with N >= 1, got {text!r}")
    return int(m.group(1)), _WINDOWS[m.group(2)]


def chat_template(loaded: LoadedModel, name: str | None) -> ChatTemplate | None:
    """The template to serve chat with, or None when the run has none and none was named."""
    eos = loaded.tokenizer.id_to_token(loaded.eos_id) if loaded.eos_id is not None else ""
    return resolve_chat_template(loaded.run_dir, name, eos or "", None)


def _check_port(host: str, port: int) -> None:
    """Fail early with one line, instead of uvicorn's log, when the port is taken."""
    try:
        with socket.create_server((host, port)):
            pass
    except OSError as e:
        raise UserError(f"port: cannot listen on {host}:{port} ({e.strerror}); "
                        "pass another --port") from None


def main(cfg: Config) -> int:
    """Load the model, start the engine thread and serve until Ctrl-C."""
    try:
        from lmforge.serve.app import ServeSettings, State, serve
    except ImportError as e:
        raise UserError(f"serve needs its extras ({e.name} is missing): "
                        "pip install 'lmforge[serve]'") from None
    keys = tuple(cfg.api_key) or tuple(k for k in [os.environ.get("LMFORGE_API_KEY")] if k)
    _check_port(cfg.host, cfg.port)
    # Each step feeds every running row one position (with a draft: draft_tokens + 1).
    rows = cfg.max_batch * (1 if cfg.draft is None else cfg.draft_tokens + 1)
    loaded = load_model(cfg.run, cfg.device, cfg.dtype, cfg.quant, rows=rows)
    draft = None  # the same placement (device, dtype, quant) as the target
    if cfg.draft is not None:
        draft = load_model(cfg.draft, cfg.device, cfg.dtype, cfg.quant, rows=cfg.max_batch)
    if draft is not None:
        check_draft_tokenizer(cfg.run, cfg.draft or "", loaded.tokenizer, draft.tokenizer)
    template = chat_template(loaded, cfg.template)
    engine = Engine(loaded.model, loaded.tokenizer.decode, eos_id=loaded.eos_id,
                    stop_ids=loaded.eos_ids,
                    max_batch=cfg.max_batch, max_queue=cfg.max_queue, max_len=cfg.max_len,
                    draft=None if draft is None else draft.model, draft_tokens=cfg.draft_tokens)
    kv_bytes = engine.cache.grown_nbytes
    limit, window = parse_rate(cfg.rate_limit) if cfg.rate_limit else (None, 60.0)
    name = cfg.model_name or loaded.run_dir.name
    state = State(engine, loaded.tokenizer, template,
                  ServeSettings(name, keys, limit, window))
    _setup_logging()
    chat = "chat: " + (template.origin if template else "off (no template; --template chatml)")
    if draft is not None:
        chat += f", draft: {draft.run_dir.name} x {cfg.draft_tokens} tokens"
    print(f"lmforge serve: {name} (step {loaded.step}) at http://{cfg.host}:{cfg.port}/v1  "
          f"[max_batch {cfg.max_batch} x {engine.context} positions (KV cache "
          f"up to {kv_bytes / 2**20:,.0f} MiB, grown on demand), max_queue {cfg.max_queue}, {chat}, "
          f"api key {'required' if keys else 'off'}]", flush=True)
    if cfg.host not in ("127.0.0.1", "localhost", "::1") and not keys:
        print(f"lmforge serve: warning: {cfg.host} is reachable from the network and no "
              "--api_key is set", file=sys.stderr, flush=True)
    serve(state, cfg.host, cfg.port)
    return 0


def _setup_logging() -> None:
    """Request log lines (already JSON) go to stderr as they are."""
    logger = logging.getLogger("lmforge.serve")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False

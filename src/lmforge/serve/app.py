"""An OpenAI-compatible HTTP API over the continuous-batching engine (FastAPI).

Routes: ``POST /v1/completions`` and ``POST /v1/chat/completions`` (``"stream": true`` sends
server-sent events ending in ``data: [DONE]``), ``GET /v1/models``, ``/health``, ``/metrics``
(Prometheus). The engine steps in its own thread; each HTTP request submits one engine request
per choice and awaits their events, which the engine thread hands to the event loop.

Everything a client sends is checked here or by the engine before any work is queued, and
every refusal is a 4xx with OpenAI's error body ``{"error": {"message", "type", "param",
"code"}}``. This is the only module that imports fastapi, uvicorn and prometheus_client; the
``serve`` recipe imports it when the command runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import math
import time
import uuid
from collections import defaultdict, deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from starlette.exceptions import HTTPException

from lmforge.config import UserError
from lmforge.infer.chat import ChatTemplate, stop_token_ids
from lmforge.infer.engine import Engine, Event, InvalidRequest, QueueFull, SamplingParams
from lmforge.infer.sampling import fit_prompt

log = logging.getLogger("lmforge.serve")

MAX_BODY_BYTES = 1 << 20
MAX_CHOICES = 16  # prompts x n in one request
SAMPLING_FIELDS = {"max_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty",
                   "presence_penalty", "frequency_penalty", "seed", "stop", "n", "stream",
                   "stream_options", "user", "logprobs", "logit_bias", "model"}
COMPLETION_FIELDS = SAMPLING_FIELDS | {"prompt", "echo", "best_of", "suffix"}
CHAT_FIELDS = SAMPLING_FIELDS | {"messages", "max_completion_tokens", "top_logprobs",
                                 "response_format", "tools", "tool_choice",
                                 "parallel_tool_calls", "store", "metadata"}


@dataclass
class ServeSettings:
    """What the app needs besides the engine."""

    model_name: str
    api_keys: tuple[str, ...] = ()
    rate_limit: int | None = None
    """Requests per ``rate_window`` seconds per API key (per client address without keys)."""
    rate_window: float = 60.0


class ApiError(Exception):
    """A refusal with an HTTP status and OpenAI's error fields."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, type_: str = "invalid_request_error",
                 retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = (
            status, message, param, code, type_)
        self.retry_after = retry_after
        """Seconds for a 429's Retry-After header: the same number its message gives."""


def error_body(message: str, type_: str, param: str | None, code: str | None) -> dict[str, Any]:
    """OpenAI's error object."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


# --------------------------------------------------------------------------- request fields


_KINDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "int": (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
    "number": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
               and math.isfinite(v), "a finite number"),
    "bool": (lambda v: isinstance(v, bool), "a boolean"),
    "str": (lambda v: isinstance(v, str), "a string"),
    "object": (lambda v: isinstance(v, dict), "an object"),
}


def _json_type(v: Any) -> str:
    names = {bool: "boolean", int: "integer", float: "number", str: "string", list: "array",
             dict: "object", type(None): "null"}
    return names.get(type(v), type(v).__name__)


def opt(body: dict[str, Any], name: str, kind: str, default: Any = None) -> Any:
    """``body[name]`` if it is of ``kind``; ``default`` when absent or null; else a 400."""
    value = body.get(name)
    if value is None:
        return default
    check, desc = _KINDS[kind]
    if not check(value):
        raise ApiError(400, f"'{name}' must be {desc}, got {_json_type(value)}", name,
                       "invalid_type")
    return value


def _stop(body: dict[str, Any]) -> tuple[str, ...]:
    value = body.get("stop")
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and all(isinstance(s, str) for s in value):
        return tuple(value)
    raise ApiError(400, "'stop' must be a string or a list of strings", "stop", "invalid_type")


def _refuse_unsupported(body: dict[str, Any], allowed: set[str]) -> None:
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise ApiError(400, f"Unrecognized request argument supplied: {unknown[0]}", unknown[0],
                       "unrecognized_argument")
    falsy = ("logprobs", "top_logprobs", "echo", "suffix", "tools", "logit_bias")
    for name in falsy:
        if body.get(name):
            raise ApiError(400, f"'{name}' is not supported by this server", name, "unsupported")
    if body.get("best_of") not in (None, 1):
        raise ApiError(400, "'best_of' is not supported by this server", "best_of", "unsupported")
    fmt = body.get("response_format")
    if fmt is not None and fmt != {"type": "text"}:
        raise ApiError(400, "only response_format {\"type\": \"text\"} is supported",
                       "response_format", "unsupported")
    if body.get("tool_choice") not in (None, "none"):
        raise ApiError(400, "tools are not supported by this server", "tool_choice",
                       "unsupported")


def sampling_params(body: dict[str, Any], max_tokens: int, extra_stop: tuple[str, ...] = (),
                    stop_ids: tuple[int, ...] = ()) -> SamplingParams:
    """The engine's parameters from an OpenAI request body (types checked; ranges by the engine)."""
    opt(body, "user", "str")
    opt(body, "stream", "bool")
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=float(opt(body, "temperature", "number", 1.0)),
        top_p=opt(body, "top_p", "number"),
        top_k=opt(body, "top_k", "int"),
        min_p=opt(body, "min_p", "number"),
        repetition_penalty=float(opt(body, "repetition_penalty", "number", 1.0)),
        presence_penalty=float(opt(body, "presence_penalty", "number", 0.0)),
        frequency_penalty=float(opt(body, "frequency_penalty", "number", 0.0)),
        seed=opt(body, "seed", "int"),
        stop=_stop(body) + extra_stop,
        stop_token_ids=stop_ids,
    )


def _is_ids(value: Any) -> bool:
    return (isinstance(value, list) and bool(value)
            and all(isinstance(t, int) and not isinstance(t, bool) for t in value))


def completion_prompts(value: Any) -> list[str | list[int]]:
    """``prompt``: a string, a list of strings, a list of token ids, or a list of those."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value:
        if all(isinstance(p, str) for p in value):
            return list(value)
        if _is_ids(value):
            return [value]
        if all(_is_ids(p) for p in value):
            return list(value)
    raise ApiError(400, "'prompt' must be a string, a list of strings, a list of token ids, "
                   "or a list of such lists", "prompt", "invalid_type")


# --------------------------------------------------------------------------- app state


@dataclass
class Metrics:
    """Prometheus series in a registry of this app's own (no process-wide globals)."""

    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.requests = Counter("lmforge_requests", "HTTP requests", ["endpoint", "status"],
                                registry=r)
        self.prompt_tokens = Counter("lmforge_prompt_tokens", "Prompt tokens", registry=r)
        self.completion_tokens = Counter("lmforge_completion_tokens", "Generated tokens",
                                         registry=r)
        self.latency = Histogram("lmforge_request_latency_seconds", "Request latency",
                                 ["endpoint"], registry=r)
        self.ttft = Histogram("lmforge_time_to_first_token_seconds",
                              "Time from request to first token", registry=r)
        self.queue_depth = Gauge("lmforge_queue_depth", "Requests waiting for a slot",
                                 registry=r)
        self.active = Gauge("lmforge_active_requests", "Requests holding a slot", registry=r)
        self.drafted = Gauge("lmforge_draft_tokens_proposed", "Tokens the draft model proposed "
                             "(serve --draft)", registry=r)
        self.accepted = Gauge("lmforge_draft_tokens_accepted", "Draft tokens the served model "
                              "kept (serve --draft)", registry=r)


class RateLimiter:
    """At most ``limit`` requests per ``window`` seconds per key (a sliding log of times)."""

    def __init__(self, limit: int, window: float) -> None:
        self.limit, self.window = limit, window
        self.times: defaultdict[str, deque[float]] = defaultdict(deque)

    def allow(self, key: str, now: float) -> float | None:
        """None if allowed (and counted), else seconds until the next slot frees."""
        times = self.times[key]
        while times and times[0] <= now - self.window:
            times.popleft()
        if len(times) >= self.limit:
            return times[0] + self.window - now
        times.append(now)
        return None


@dataclass
class State:
    """Everything the routes share."""

    engine: Engine
    tokenizer: Any
    template: ChatTemplate | None
    settings: ServeSettings
    metrics: Metrics = field(default_factory=Metrics)
    limiter: RateLimiter | None = None

    def __post_init__(self) -> None:
        if self.settings.rate_limit is not None:
            self.limiter = RateLimiter(self.settings.rate_limit, self.settings.rate_window)


# --------------------------------------------------------------------------- engine bridge


class Job:
    """The engine requests behind one HTTP request (one per choice) and their events.

    The engine thread appends events to a deque and wakes the event loop only when it sleeps
    on them, and for a response sent whole only at a choice's first and last event: one loop
    wake-up per token and request cost the engine thread its core and the GIL at every step
    (measured in benchmarks/generation.py, `lmforge serve` throughput).
    """

    def __init__(self, state: State, prompts: list[list[int]], params: list[SamplingParams],
                 rid: str, stream: bool = True) -> None:
        self.loop = asyncio.get_running_loop()
        self.pending: deque[tuple[int, Event]] = deque()  # appended by the engine thread
        self.ready = asyncio.Event()  # set (in the loop) when pending may have something
        self.stream, self.waiting = stream, False
        self.handles = []
        self.start, self.ttft = time.perf_counter(), state.metrics.ttft
        try:
            for i, (ids, p) in enumerate(zip(prompts, params)):
                sink = self._sink(i)
                self.handles.append(state.engine.submit(ids, p, sink, f"{rid}-{i}"))
        except Exception:
            self.cancel()
            raise

    def _sink(self, index: int) -> Callable[[Event], None]:
        first = True

        def put(event: Event) -> None:  # runs in the engine thread
            nonlocal first
            self.pending.append((index, event))
            wanted = self.stream or first or event.finish_reason is not None
            first = False
            if wanted and not self.waiting:
                self.waiting = True  # one wake-up until the loop has drained the deque
                self.loop.call_soon_threadsafe(self.ready.set)
        return put

    def cancel(self) -> None:
        """Free the slots of every choice still running (client gone, or an error)."""
        for h in self.handles:
            h.cancel()

    async def events(self, request: Request | None = None) -> AsyncIterator[tuple[int, Event]]:
        """Events of all choices until each has finished; checks every second whether the
        client of a non-streamed request has left (a stream notices when a write fails)."""
        left, checked = len(self.handles), time.monotonic()
        while left:
            if not self.pending:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.ready.wait(), timeout=1.0)
                # Cleared before draining: an event appended after this point wakes us again.
                self.ready.clear()
                self.waiting = False
            if request is not None and time.monotonic() - checked > 1.0:
                checked = time.monotonic()
                if await request.is_disconnected():
                    self.cancel()
                    return
            while self.pending:
                index, event = self.pending.popleft()
                if self.ttft is not None:  # the first event carries the first token
                    self.ttft.observe(time.perf_counter() - self.start)
                    self.ttft = None
                left -= event.finish_reason is not None
                yield index, event


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _record(state: State, request: Request, job: Job, finals: dict[int, Event]) -> dict:
    """Count tokens for /metrics and the request's log line; return the usage object."""
    prompt = sum(h.prompt_tokens for h in job.handles)
    completion = sum(e.completion_tokens for e in finals.values())
    state.metrics.prompt_tokens.inc(prompt)
    state.metrics.completion_tokens.inc(completion)
    reasons = ",".join(sorted({str(e.finish_reason) for e in finals.values()}))
    request.scope["lmforge.log"].update(prompt_tokens=prompt, completion_tokens=completion,
                                        finish_reason=reasons)
    errors = [e.error for e in finals.values() if e.finish_reason == "error"]
    if errors:
        raise ApiError(500, f"generation failed: {errors[0]}", None, None, "server_error")
    return _usage(prompt, completion)


# --------------------------------------------------------------------------- routes


async def read_json(request: Request) -> dict[str, Any]:
    """The body as a JSON object, at most MAX_BODY_BYTES; a 400 or 413 otherwise."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise ApiError(413, f"request body larger than {MAX_BODY_BYTES} bytes", None,
                           "body_too_large")
        chunks.append(chunk)
    try:
        body = json.loads(b"".join(chunks))
    except (ValueError, RecursionError):  # ValueError covers bad UTF-8 and bad JSON
        raise ApiError(400, "We could not parse the JSON body of your request. (HINT: This "
                       "likely means you aren't using your HTTP library correctly.)", None,
                       "invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object", None, "invalid_json")
    _refuse_bad_text(body)
    return body


def _refuse_bad_text(body: dict[str, Any]) -> None:
    """A 400 naming the field when any string (or key) holds an unpaired surrogate.

    JSON may escape one ("\\udcff") although it is no Unicode text: the tokenizer (and any
    UTF-8 encoder, the error body's included) fails on it later, inside a handler, as a 500.
    Checked once here for every field of every endpoint; iterative, so a deeply nested body
    cannot exhaust the stack.
    """
    stack: list[tuple[str, Any]] = [(k, k) for k in body] + list(body.items())
    while stack:
        field, value = stack.pop()
        if isinstance(value, dict):
            stack.extend((field, x) for kv in value.items() for x in kv)
        elif isinstance(value, list):
            stack.extend((field, x) for x in value)
        elif isinstance(value, str) and not _is_unicode(value):
            name = field if _is_unicode(field) else None  # the bad text never goes back out
            raise ApiError(400, f"'{name or 'a key'}' holds text that is not valid Unicode (an "
                           "unpaired surrogate such as \\udcff); send UTF-8 text", name,
                           "invalid_value")


def _is_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def authorize(state: State, request: Request, count: bool) -> None:
    """Check the Bearer key (if keys are set) and the per-key rate limit."""
    key = request.client.host if request.client else "unknown"
    if state.settings.api_keys:
        auth = request.headers.get("authorization", "")
        token = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
        if token not in state.settings.api_keys:
            raise ApiError(401, "Incorrect API key provided", None, "invalid_api_key")
        key = hashlib.sha256(token.encode()).hexdigest()[:12]  # never log the key itself
    request.scope["lmforge.log"]["key"] = key
    if count and state.limiter is not None:
        wait = state.limiter.allow(key, time.monotonic())
        if wait is not None:
            seconds = max(1, math.ceil(wait))
            raise ApiError(429, f"Rate limit reached: {state.limiter.limit} requests per "
                           f"{state.limiter.window:g} s; retry in {seconds} s", None,
                           "rate_limit_exceeded", "rate_limit_error", retry_after=seconds)


def check_model(state: State, body: dict[str, Any]) -> None:
    """``model`` must name the model this server serves."""
    name = body.get("model")
    if name is None:
        raise ApiError(400, "you must provide a model parameter", "model", "missing_required")
    if name != state.settings.model_name:
        shown = name if isinstance(name, str) else _json_type(name)
        raise ApiError(404, f"The model `{shown}` does not exist; this server serves "
                       f"`{state.settings.model_name}`", "model", "model_not_found")


def _choice_params(body: dict[str, Any], base: SamplingParams, n: int) -> list[SamplingParams]:
    """One SamplingParams per choice: with a seed, choice i uses seed + i (else all equal)."""
    if base.seed is None:
        return [base] * n
    return [SamplingParams(**{**base.__dict__, "seed": base.seed + i}) for i in range(n)]


def _n(body: dict[str, Any], prompts: int) -> int:
    n = opt(body, "n", "int", 1)
    if not 1 <= n <= MAX_CHOICES or n * prompts > MAX_CHOICES:
        raise ApiError(400, f"'n' must be between 1 and {MAX_CHOICES} (times the number of "
                       f"prompts), got {n}", "n", "invalid_value")
    return n


def _stream_options(body: dict[str, Any]) -> bool:
    options = opt(body, "stream_options", "object", {})
    if not opt(body, "stream", "bool", False) and options:
        raise ApiError(400, "'stream_options' needs 'stream': true", "stream_options",
                       "invalid_value")
    return bool(opt(options, "include_usage", "bool", False))


def _sse(data: dict[str, Any] | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


async def completions(state: State, request: Request) -> Response:
    """POST /v1/completions."""
    authorize(state, request, count=True)
    body = await read_json(request)
    check_model(state, body)
    _refuse_unsupported(body, COMPLETION_FIELDS)
    if "prompt" not in body:
        raise ApiError(400, "you must provide a prompt", "prompt", "missing_required")
    prompts = completion_prompts(body["prompt"])
    n = _n(body, len(prompts))
    base = sampling_params(body, opt(body, "max_tokens", "int", 16))
    ids = [_encode(state, p) for p in prompts for _ in range(n)]
    params = [p for _ in prompts for p in _choice_params(body, base, n)]
    return await _run(state, request, body, ids, params, chat=False)


async def chat_completions(state: State, request: Request) -> Response:
    """POST /v1/chat/completions."""
    authorize(state, request, count=True)
    body = await read_json(request)
    check_model(state, body)
    _refuse_unsupported(body, CHAT_FIELDS)
    template = state.template
    if template is None:
        raise ApiError(400, "this model has no chat template; restart the server with "
                       "--template chatml (or a .jinja file)", "messages", "no_chat_template")
    n = _n(body, 1)
    text = template.render(body.get("messages"))  # InvalidRequest on malformed messages
    ids = state.tokenizer.encode(text, add_special_tokens=False).ids or _encode(state, "")
    max_tokens = opt(body, "max_completion_tokens", "int")
    if max_tokens is None:
        max_tokens = opt(body, "max_tokens", "int")
    if max_tokens is None:  # OpenAI's default for chat: whatever the context leaves
        max_tokens = fit_prompt(ids, None, state.engine.context, truncate=False)[1]
    stop_ids = stop_token_ids(template.stop, state.tokenizer.token_to_id)
    base = sampling_params(body, max_tokens, template.stop, stop_ids)
    return await _run(state, request, body, [ids] * n, _choice_params(body, base, n), chat=True)


def _encode(state: State, prompt: str | list[int]) -> list[int]:
    if isinstance(prompt, list):
        return prompt
    ids = state.tokenizer.encode(prompt).ids if prompt else []
    eos = state.engine.eos_id
    return ids or ([eos] if eos is not None else [])  # empty prompt: a fresh document


async def _run(state: State, request: Request, body: dict[str, Any], prompts: list[list[int]],
               params: list[SamplingParams], chat: bool) -> Response:
    include_usage = _stream_options(body)
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
    request.scope["lmforge.log"]["id"] = rid
    stream = bool(opt(body, "stream", "bool", False))
    job = Job(state, prompts, params, rid, stream)
    head = {"id": rid, "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()), "model": state.settings.model_name}
    if stream:
        return StreamingResponse(_stream(state, request, job, head, chat, include_usage),
                                 media_type="text/event-stream")
    texts: dict[int, list[str]] = defaultdict(list)
    finals: dict[int, Event] = {}
    async for index, event in job.events(request):
        texts[index].append(event.text)
        if event.finish_reason is not None:
            finals[index] = event
    if len(finals) < len(job.handles):  # the client left; nobody will read this
        request.scope["lmforge.log"]["finish_reason"] = "client_gone"
        return Response(status_code=499)
    usage = _record(state, request, job, finals)
    choices = [_choice(i, "".join(texts[i]), finals[i].finish_reason, chat)
               for i in range(len(job.handles))]
    return JSONResponse({**head, "choices": choices, "usage": usage})


def _choice(index: int, text: str, finish: str | None, chat: bool) -> dict[str, Any]:
    if chat:
        return {"index": index, "message": {"role": "assistant", "content": text},
                "logprobs": None, "finish_reason": finish}
    return {"index": index, "text": text, "logprobs": None, "finish_reason": finish}


def _delta(index: int, text: str, finish: str | None, chat: bool) -> dict[str, Any]:
    if chat:
        delta = {"content": text} if text else {}
        return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
    return {"index": index, "text": text, "logprobs": None, "finish_reason": finish}


async def _stream(state: State, request: Request, job: Job, head: dict[str, Any], chat: bool,
                  include_usage: bool) -> AsyncIterator[str]:
    """Server-sent events: a chunk per piece of text, a last chunk per choice, [DONE]."""
    head = {**head, "object": "chat.completion.chunk" if chat else "text_completion"}
    finals: dict[int, Event] = {}
    try:
        if chat:  # OpenAI opens each choice with the assistant role
            for i in range(len(job.handles)):
                first = {"index": i, "delta": {"role": "assistant", "content": ""},
                         "logprobs": None, "finish_reason": None}
                yield _sse({**head, "choices": [first]})
        async for index, event in job.events():
            if event.finish_reason == "error":
                finals[index] = event
                continue
            if event.text or event.finish_reason is not None:
                choice = _delta(index, event.text, event.finish_reason, chat)
                yield _sse({**head, "choices": [choice]})
            if event.finish_reason is not None:
                finals[index] = event
        try:
            usage = _record(state, request, job, finals)
        except ApiError as e:
            yield _sse(error_body(e.message, e.type, e.param, e.code))
        else:
            if include_usage:
                yield _sse({**head, "choices": [], "usage": usage})
        yield _sse("[DONE]")
    finally:  # the client left mid-stream (or we are done): free the slots now
        if len(finals) < len(job.handles):
            request.scope["lmforge.log"]["finish_reason"] = "client_gone"
        job.cancel()


async def list_models(state: State, request: Request) -> Response:
    """GET /v1/models."""
    authorize(state, request, count=False)
    model = {"id": state.settings.model_name, "object": "model", "created": 0,
             "owned_by": "lmforge", "max_model_len": state.engine.context}
    return JSONResponse({"object": "list", "data": [model]})


async def health(state: State, request: Request) -> Response:
    """GET /health: 200 while the engine thread is alive."""
    ok = state.engine.running
    body = {"status": "ok" if ok else "engine stopped", "model": state.settings.model_name,
            "queue_depth": state.engine.queue_depth, "active": state.engine.active}
    return JSONResponse(body, status_code=200 if ok else 503)


async def metrics(state: State, request: Request) -> Response:
    """GET /metrics in Prometheus' text format."""
    state.metrics.queue_depth.set(state.engine.queue_depth)
    state.metrics.active.set(state.engine.active)
    state.metrics.drafted.set(state.engine.spec.proposed)
    state.metrics.accepted.set(state.engine.spec.accepted)
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)


# --------------------------------------------------------------------------- the app


ROUTES: dict[tuple[str, str], Callable[[State, Request], Awaitable[Response]]] = {
    ("POST", "/v1/completions"): completions,
    ("POST", "/v1/chat/completions"): chat_completions,
    ("GET", "/v1/models"): list_models,
    ("GET", "/health"): health,
    ("GET", "/metrics"): metrics,
}


class Observe:
    """ASGI middleware: one JSON log line and the request metrics per HTTP request.

    Pure ASGI rather than ``@app.middleware``, so it sees the end of a streamed response
    (its real latency and token counts) and does not buffer the stream.
    """

    def __init__(self, app: Any, state: State) -> None:
        self.app, self.state = app, state

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start, status = time.perf_counter(), 500
        info: dict[str, Any] = {"id": uuid.uuid4().hex[:12]}
        scope["lmforge.log"] = info

        async def send_status(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            latency = time.perf_counter() - start
            known = (scope["method"], scope["path"]) in ROUTES
            endpoint = scope["path"] if known else "other"
            self.state.metrics.requests.labels(endpoint, str(status)).inc()
            self.state.metrics.latency.labels(endpoint).observe(latency)
            line = {"event": "request", **info, "method": scope["method"], "path": endpoint,
                    "status": status, "latency_ms": round(latency * 1000, 1)}
            log.info(json.dumps(line))


def _error_response(e: Exception) -> JSONResponse:
    if isinstance(e, ApiError):
        wait = e.retry_after if e.retry_after is not None else 1
        headers = {"Retry-After": str(wait)} if e.status == 429 else None
        return JSONResponse(error_body(e.message, e.type, e.param, e.code), e.status, headers)
    if isinstance(e, InvalidRequest):
        return JSONResponse(error_body(str(e), "invalid_request_error", e.param, e.code), 400)
    if isinstance(e, QueueFull):
        return JSONResponse(error_body(f"The server is overloaded: {e}", "rate_limit_error",
                                       None, "queue_full"), 429, {"Retry-After": "1"})
    if isinstance(e, UserError):
        return JSONResponse(error_body(str(e), "invalid_request_error", None, None), 400)
    log.exception("unhandled error", exc_info=e)
    return JSONResponse(error_body("internal server error", "server_error", None, None), 500)


def create_app(state: State) -> Any:
    """The ASGI app: routes, error bodies, logging and metrics; the engine runs while it does."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.engine.start()
        yield
        state.engine.stop()

    app = FastAPI(title="lmforge", docs_url=None, redoc_url=None, openapi_url=None,
                  lifespan=lifespan)
    for (method, path), handler in ROUTES.items():
        app.add_api_route(path, _endpoint(state, handler), methods=[method])

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        return JSONResponse(error_body(str(e.detail), "invalid_request_error", None, code),
                            e.status_code)

    return Observe(app, state)


def _endpoint(state: State, handler: Callable[[State, Request], Awaitable[Response]]) -> Any:
    """A FastAPI endpoint calling ``handler`` that turns every exception into an error body."""

    async def endpoint(request: Request) -> Response:
        try:
            return await handler(state, request)
        except Exception as e:  # nothing a client sends may escape as a traceback
            return _error_response(e)

    endpoint.__name__ = handler.__name__
    endpoint.__doc__ = handler.__doc__
    return endpoint


def serve(state: State, host: str, port: int) -> None:
    """Run the app with uvicorn until Ctrl-C (access log off: ``Observe`` logs each request)."""
    import uvicorn

    uvicorn.run(create_app(state), host=host, port=port, log_level="warning",
                access_log=False, timeout_graceful_shutdown=5)

"""Whatever a client sends, the server answers with a 4xx OpenAI error body and keeps serving."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.serve import Server, make_tiny_run

KEYS = ("key-a", "key-b", "key-c")
GOOD = {"model": "tiny", "prompt": "The list", "max_tokens": 4, "temperature": 0}
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
LIMIT = 150  # requests per minute per key


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    run = make_tiny_run(tmp_path_factory.mktemp("bad"), block_size=256)
    srv = Server(run, "--api_key", ",".join(KEYS), "--rate_limit", f"{LIMIT}/min",
                 "--max_batch", "1", "--max_queue", "1").start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def http(server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.base, timeout=60,
                      headers={"Authorization": f"Bearer {KEYS[0]}"}) as c:
        yield c


def assert_error(r: httpx.Response, status: int, param: str | None = None,
                 code: str | None = None) -> None:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert error["type"] in {"invalid_request_error", "rate_limit_error"}
    if param is not None:
        assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error


def with_(base: dict[str, Any], **changes: Any) -> dict[str, Any]:
    out = {**base, **changes}
    return {k: v for k, v in out.items() if v is not ...}


COMPLETION_CASES = [
    (with_(GOOD, model=...), 400, "model"),
    (with_(GOOD, model="gpt-4"), 404, "model"),
    (with_(GOOD, model=123), 404, "model"),
    (with_(GOOD, prompt=...), 400, "prompt"),
    (with_(GOOD, prompt=123), 400, "prompt"),
    (with_(GOOD, prompt=[]), 400, "prompt"),
    (with_(GOOD, prompt=[1.5, 2]), 400, "prompt"),
    (with_(GOOD, prompt=[[]]), 400, "prompt"),
    (with_(GOOD, prompt={"text": "hi"}), 400, "prompt"),
    (with_(GOOD, prompt=[999999]), 400, "prompt"),
    (with_(GOOD, prompt=[-3]), 400, "prompt"),
    (with_(GOOD, prompt="word " * 400), 400, "prompt"),
    (with_(GOOD, max_tokens=0), 400, "max_tokens"),
    (with_(GOOD, max_tokens=-5), 400, "max_tokens"),
    (with_(GOOD, max_tokens=10**9), 400, "max_tokens"),
    (with_(GOOD, max_tokens=10**40), 400, "max_tokens"),
    (with_(GOOD, max_tokens="16"), 400, "max_tokens"),
    (with_(GOOD, max_tokens=1.5), 400, "max_tokens"),
    (with_(GOOD, max_tokens=True), 400, "max_tokens"),
    (with_(GOOD, temperature=-1), 400, "temperature"),
    (with_(GOOD, temperature=2.5), 400, "temperature"),
    (with_(GOOD, temperature="hot"), 400, "temperature"),
    (with_(GOOD, top_p=0), 400, "top_p"),
    (with_(GOOD, top_p=1.5), 400, "top_p"),
    (with_(GOOD, top_k=0), 400, "top_k"),
    (with_(GOOD, top_k=2.5), 400, "top_k"),
    (with_(GOOD, min_p=-0.1), 400, "min_p"),
    (with_(GOOD, repetition_penalty=0), 400, "repetition_penalty"),
    (with_(GOOD, presence_penalty=3), 400, "presence_penalty"),
    (with_(GOOD, frequency_penalty=-2.5), 400, "frequency_penalty"),
    (with_(GOOD, seed="seven"), 400, "seed"),
    (with_(GOOD, n=0), 400, "n"),
    (with_(GOOD, n=1000), 400, "n"),
    (with_(GOOD, stop=["a", "b", "c", "d", "e"]), 400, "stop"),
    (with_(GOOD, stop=[1]), 400, "stop"),
    (with_(GOOD, stop=[""]), 400, "stop"),
    (with_(GOOD, stream="yes"), 400, "stream"),
    (with_(GOOD, stream_options={"include_usage": True}), 400, "stream_options"),
    (with_(GOOD, logprobs=5), 400, "logprobs"),
    (with_(GOOD, echo=True), 400, "echo"),
    (with_(GOOD, best_of=3), 400, "best_of"),
    (with_(GOOD, frobnicate=1), 400, "frobnicate"),
]

CHAT_CASES = [
    (with_(CHAT, messages=...), 400, "messages"),
    (with_(CHAT, messages="hi"), 400, "messages"),
    (with_(CHAT, messages=[]), 400, "messages"),
    (with_(CHAT, messages=[{"role": "wizard", "content": "x"}]), 400, "messages[0].role"),
    (with_(CHAT, messages=[{"role": "user"}]), 400, "messages[0].content"),
    (with_(CHAT, messages=[{"role": "user", "content": [{"type": "image_url"}]}]), 400,
     "messages[0].content"),
    (with_(CHAT, messages=[{"role": "user", "content": "word " * 400}]), 400, "prompt"),
    (with_(CHAT, max_completion_tokens=0), 400, "max_tokens"),
    (with_(CHAT, tools=[{"type": "function"}]), 400, "tools"),
    (with_(CHAT, response_format={"type": "json_object"}), 400, "response_format"),
    (with_(CHAT, temperature=float("inf")), 400, "temperature"),
]


def test_malformed_requests_get_4xx_error_bodies_and_the_server_survives(
        http: httpx.Client) -> None:
    for body, status, param in COMPLETION_CASES:
        assert_error(http.post("/v1/completions", json=body), status, param)
    for body, status, param in CHAT_CASES:
        if body.get("temperature") == float("inf"):  # not JSON: Python writes Infinity
            r = http.post("/v1/chat/completions", content=b'{"model": "tiny", "messages": '
                          b'[{"role": "user", "content": "x"}], "temperature": Infinity}')
        else:
            r = http.post("/v1/chat/completions", json=body)
        assert_error(r, status, param)
    raw = [b"{not json", b"", b"[1, 2]", b'"text"', b"\xff\xfe\x00", b"[" * 100_000,
           b'{"model": "tiny", "prompt": "x", "temperature": NaN}']
    for content in raw:
        r = http.post("/v1/completions", content=content,
                      headers={"Content-Type": "application/json"})
        assert_error(r, 400)
    assert_error(http.post("/v1/completions", content=b" " * (2 << 20)), 413)
    assert_error(http.get("/v1/completions"), 405)
    assert_error(http.post("/v1/nothing", json=GOOD), 404)
    assert_error(http.post("/v1/completions", json=GOOD, headers={"Authorization": "x"}), 401)
    # ... and after all that, good requests still work.
    assert http.get("/health").json()["status"] == "ok"
    r = http.post("/v1/completions", json=GOOD)
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "length"
    assert http.post("/v1/chat/completions", json=CHAT).status_code == 200


# An unpaired surrogate is valid JSON ("\\udcff") but no Unicode text: no tokenizer takes it.
SURROGATE_CASES = [
    ("/v1/completions", b'{"model": "tiny", "prompt": "a\\udcff", "max_tokens": 2}', "prompt"),
    ("/v1/completions", b'{"model": "tiny", "prompt": ["ok", "\\ud800"]}', "prompt"),
    ("/v1/completions", b'{"model": "tiny", "prompt": "x", "stop": ["\\udcff"]}', "stop"),
    ("/v1/completions", b'{"model": "tiny", "prompt": "x", "user": "\\udfff"}', "user"),
    ("/v1/chat/completions", b'{"model": "tiny", "messages": [{"role": "user", '
     b'"content": "hi \\udcff"}], "max_tokens": 2}', "messages"),
    ("/v1/chat/completions", b'{"model": "tiny", "messages": [{"role": "user", '
     b'"content": [{"type": "text", "text": "\\udcff"}]}]}', "messages"),
    ("/v1/chat/completions", b'{"model": "tiny", "messages": [{"role": "user", '
     b'"\\udcff": "x"}]}', "messages"),
    ("/v1/completions", b'{"model": "tiny", "prompt": "x", "\\udcff": 1}', None),
]


@pytest.mark.parametrize(("path", "content", "param"), SURROGATE_CASES)
def test_text_no_tokenizer_takes_is_a_400_naming_the_field(
        http: httpx.Client, path: str, content: bytes, param: str | None) -> None:
    r = http.post(path, content=content, headers={"Content-Type": "application/json"})
    assert_error(r, 400, param, "invalid_value")
    assert "Unicode" in r.json()["error"]["message"]
    assert http.post("/v1/completions", json=GOOD).status_code == 200


def test_context_errors_say_how_much_fits(http: httpx.Client) -> None:
    r = http.post("/v1/completions", json=with_(GOOD, max_tokens=300))
    assert_error(r, 400, "max_tokens", "context_length_exceeded")
    assert "at most" in r.json()["error"]["message"]


def test_rate_limit_is_per_key(server: Server) -> None:
    with httpx.Client(base_url=server.base, headers={"Authorization": f"Bearer {KEYS[1]}"},
                      timeout=60) as c:
        codes = [c.post("/v1/completions", content=b"{").status_code for _ in range(LIMIT)]
        assert codes == [400] * LIMIT  # counted, though refused for their body
        r = c.post("/v1/completions", json=GOOD)
        assert_error(r, 429, code="rate_limit_exceeded")
        wait = int(r.headers["retry-after"])
        assert wait >= 1 and f"retry in {wait} s" in r.json()["error"]["message"]
    other = httpx.post(server.base + "/v1/completions", json=GOOD,
                       headers={"Authorization": f"Bearer {KEYS[2]}"}, timeout=60)
    assert other.status_code == 200


def test_full_queue_is_429_and_the_server_recovers(server: Server) -> None:
    headers = {"Authorization": f"Bearer {KEYS[2]}"}
    long = {"model": "tiny", "prompt": "x", "max_tokens": 250, "temperature": 0, "stream": True}
    waiting: dict[str, int] = {}

    def queued() -> None:  # holds the one queue place while the first request runs
        r = httpx.post(server.url + "/completions", json=with_(long, stream=False),
                       headers=headers, timeout=60)
        waiting["status"] = r.status_code

    with httpx.stream("POST", server.url + "/completions", json=long, headers=headers,
                      timeout=60) as running:
        lines = running.iter_lines()
        next(lines)  # the only slot is taken
        thread = threading.Thread(target=queued)
        thread.start()
        deadline = time.monotonic() + 10
        while httpx.get(server.base + "/health").json()["queue_depth"] < 1:
            assert time.monotonic() < deadline, "the second request never queued"
            time.sleep(0.01)
        r = httpx.post(server.url + "/completions", json=GOOD, headers=headers, timeout=60)
        assert_error(r, 429, code="queue_full")
        for _ in lines:  # let the first one finish
            pass
    thread.join(timeout=60)
    assert waiting["status"] == 200
    r = httpx.post(server.url + "/completions", json=GOOD, headers=headers, timeout=60)
    assert r.status_code == 200

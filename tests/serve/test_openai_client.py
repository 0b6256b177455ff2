"""A real `lmforge serve` process, driven by the official `openai` client.

The server runs a tiny random-init decoder made on the spot; the reference for every greedy
answer is the same run generating alone (the CLI, or ``lmforge.load`` in this process).
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from rich.control import strip_control_codes

import lmforge
from lmforge.api import LM
from tests.serve import LMFORGE, Server, make_tiny_run

openai = pytest.importorskip("openai")

KEY = "test-key"
PROMPTS = ["The list", "A class is", "x = 1\n", "Raise an", "def f(", "import", "When the",
           "Return"]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_run(tmp_path_factory.mktemp("serve"), block_size=512)


@pytest.fixture(scope="module")
def server(run: Path) -> Iterator[Server]:
    srv = Server(run, "--api_key", KEY, "--max_batch", "4").start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url, api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def local(run: Path) -> LM:
    return lmforge.load(run)


def greedy(local: LM, prompt: str, n: int) -> str:
    return local.generate(prompt, max_new_tokens=n, temperature=0.0)  # type: ignore[return-value]


def log_lines(server: Server) -> list[dict]:
    lines = [line for line in server.log.read_text().splitlines() if line.startswith("{")]
    return [json.loads(line) for line in lines]


def test_models_and_health(client: openai.OpenAI, server: Server) -> None:
    assert [m.id for m in client.models.list().data] == ["tiny"]
    health = httpx.get(server.base + "/health").json()
    assert health["status"] == "ok" and health["model"] == "tiny"


def test_greedy_completion_equals_lmforge_generate(client: openai.OpenAI, run: Path,
                                                  local: LM) -> None:
    prompt = "The list"
    response = client.completions.create(model="tiny", prompt=prompt, max_tokens=24,
                                         temperature=0)
    text = response.choices[0].text
    assert text == greedy(local, prompt, 24)
    assert response.choices[0].finish_reason == "length"
    assert response.usage.completion_tokens == 24
    assert response.usage.prompt_tokens == len(local.tokenizer.encode(prompt).ids)
    cli = subprocess.run([*LMFORGE, "generate", "--run", str(run), "--prompt", prompt,
                          "--greedy", "--max_new_tokens", "24"],
                         capture_output=True, text=True, timeout=120, check=True)
    # The terminal printer (rich) drops control characters, which a random model does emit.
    assert cli.stdout == strip_control_codes(prompt + text) + "\n"


def test_streaming_equals_non_streaming_and_ends_with_done(client: openai.OpenAI,
                                                          server: Server) -> None:
    kw = dict(model="tiny", prompt="A class is", max_tokens=30, temperature=0)
    whole = client.completions.create(**kw).choices[0].text  # type: ignore[call-overload]
    chunks = list(client.completions.create(**kw, stream=True))  # type: ignore[call-overload]
    assert "".join(c.choices[0].text for c in chunks) == whole
    assert chunks[-1].choices[0].finish_reason == "length"
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
    body = {**kw, "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", server.url + "/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}) as r:
        events = [line for line in r.iter_lines() if line]
    assert r.headers["content-type"].startswith("text/event-stream")
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[-2][6:])["usage"]["completion_tokens"] == 30


def test_chat_greedy_matches_the_python_api_streaming_or_not(client: openai.OpenAI,
                                                            local: LM) -> None:
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "What is a list?"}]
    expected = local.chat(messages, max_new_tokens=20, temperature=0.0)
    response = client.chat.completions.create(model="tiny", messages=messages,  # type: ignore[arg-type]
                                              max_tokens=20, temperature=0)
    assert response.choices[0].message.content == expected
    assert response.choices[0].message.role == "assistant"
    stream = client.chat.completions.create(model="tiny", messages=messages,  # type: ignore[arg-type]
                                            max_tokens=20, temperature=0, stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected


def test_concurrent_requests_each_equal_their_lone_greedy_answer(client: openai.OpenAI,
                                                                local: LM) -> None:
    lengths = [8 + 7 * i for i in range(len(PROMPTS))]  # they finish at different times

    def ask(i: int) -> str:
        r = client.completions.create(model="tiny", prompt=PROMPTS[i], max_tokens=lengths[i],
                                      temperature=0)
        return r.choices[0].text

    with ThreadPoolExecutor(len(PROMPTS)) as pool:  # 8 clients, 4 slots: some wait
        answers = list(pool.map(ask, range(len(PROMPTS))))
    for prompt, n, answer in zip(PROMPTS, lengths, answers):
        assert answer == greedy(local, prompt, n)


def test_seeded_sampling_is_reproducible_and_choices_differ(client: openai.OpenAI) -> None:
    kw = dict(model="tiny", prompt="When the", max_tokens=16, temperature=1.0, top_p=0.9,
              seed=42, n=2)
    first = client.completions.create(**kw)  # type: ignore[call-overload]
    second = client.completions.create(**kw)  # type: ignore[call-overload]
    texts = [c.text for c in sorted(first.choices, key=lambda c: c.index)]
    assert texts == [c.text for c in sorted(second.choices, key=lambda c: c.index)]
    assert texts[0] != texts[1]  # choice i samples with seed + i


def test_stop_string_ends_the_text(client: openai.OpenAI, local: LM) -> None:
    full = greedy(local, "Return", 30)
    stop = full[8:11]
    r = client.completions.create(model="tiny", prompt="Return", max_tokens=30, temperature=0,
                                  stop=[stop])
    assert r.choices[0].text == full[: full.index(stop)]
    assert r.choices[0].finish_reason == "stop"


def test_client_leaving_mid_stream_frees_the_slot(server: Server) -> None:
    body = {"model": "tiny", "prompt": "x", "max_tokens": 500, "temperature": 0, "stream": True}
    with httpx.stream("POST", server.url + "/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}) as r:
        next(r.iter_lines())  # the first token arrived; now hang up
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        lines = [x for x in log_lines(server) if x.get("finish_reason") == "client_gone"]
        if lines and httpx.get(server.base + "/health").json()["active"] == 0:
            break
        time.sleep(0.05)
    assert lines, "the server never noticed the client leaving"
    assert httpx.get(server.base + "/health").json()["active"] == 0


def test_metrics_and_one_json_log_line_per_request(client: openai.OpenAI,
                                                   server: Server) -> None:
    r = client.completions.create(model="tiny", prompt="import", max_tokens=5, temperature=0)
    metrics = httpx.get(server.base + "/metrics").text
    assert 'lmforge_requests_total{endpoint="/v1/completions",status="200"}' in metrics
    assert "lmforge_completion_tokens_total" in metrics and "lmforge_queue_depth" in metrics
    assert "lmforge_request_latency_seconds_bucket" in metrics
    time.sleep(0.2)  # the line is written as the response ends
    mine = [x for x in log_lines(server) if x.get("id") == r.id]
    assert len(mine) == 1
    assert mine[0]["status"] == 200 and mine[0]["completion_tokens"] == 5
    assert mine[0]["latency_ms"] > 0 and KEY not in json.dumps(mine[0])


def test_wrong_api_key_is_refused(server: Server) -> None:
    bad = openai.OpenAI(base_url=server.url, api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as info:
        bad.completions.create(model="tiny", prompt="x", max_tokens=2)
    assert info.value.status_code == 401
    assert info.value.body["code"] == "invalid_api_key"  # type: ignore[index]

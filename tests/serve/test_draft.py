"""`lmforge serve --draft`: speculative decoding in the batched engine, through the real server
and the official `openai` client. The reference is the same target run generating alone."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from tokenizers import Tokenizer

import lmforge
from lmforge.api import LM
from lmforge.config import UserError
from lmforge.recipes import serve
from tests.serve import Server, free_port, make_tiny_run

openai = pytest.importorskip("openai")

PROMPTS = ["The list", "A class is", "x = 1\n", "Raise an", "def f(", "import"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("draft")
    target = make_tiny_run(root, "target", block_size=256)
    draft = make_tiny_run(root, "draft", block_size=256, seed=1)  # same BPE, other weights
    return target, draft


@pytest.fixture(scope="module")
def client(runs: tuple[Path, Path]) -> Iterator[openai.OpenAI]:
    target, draft = runs
    srv = Server(target, "--draft", str(draft), "--draft_tokens", "3", "--max_batch", "4")
    srv.start()
    yield openai.OpenAI(base_url=srv.url, api_key="none", max_retries=0, timeout=60)
    srv.stop()


@pytest.fixture(scope="module")
def local(runs: tuple[Path, Path]) -> LM:
    return lmforge.load(runs[0])


def test_greedy_answers_equal_the_target_alone_under_concurrency(client: openai.OpenAI,
                                                                 local: LM) -> None:
    lengths = [6 + 9 * i for i in range(len(PROMPTS))]  # they finish at different times

    def ask(i: int) -> str:
        r = client.completions.create(model="target", prompt=PROMPTS[i], max_tokens=lengths[i],
                                      temperature=0)
        return r.choices[0].text

    with ThreadPoolExecutor(len(PROMPTS)) as pool:  # 6 clients, 4 slots: some join midway
        answers = list(pool.map(ask, range(len(PROMPTS))))
    for prompt, n, answer in zip(PROMPTS, lengths, answers):
        assert answer == local.generate(prompt, max_new_tokens=n, temperature=0.0)
    messages = [{"role": "user", "content": "What is a list?"}]
    stream = client.chat.completions.create(model="target", messages=messages,  # type: ignore[arg-type]
                                            max_tokens=20, temperature=0, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in stream)
    assert text == local.chat(messages, max_new_tokens=20, temperature=0.0)


def test_metrics_count_the_draft_tokens(client: openai.OpenAI) -> None:
    client.completions.create(model="target", prompt="The list", max_tokens=8, temperature=0)
    metrics = httpx.get(str(client.base_url).removesuffix("v1/") + "metrics").text
    values = {line.split()[0]: float(line.split()[1]) for line in metrics.splitlines()
              if line.startswith("lmforge_draft_tokens")}
    assert values["lmforge_draft_tokens_proposed"] >= values["lmforge_draft_tokens_accepted"]
    assert values["lmforge_draft_tokens_proposed"] > 0


def test_seeded_sampling_repeats_and_penalties_are_refused(client: openai.OpenAI) -> None:
    kw = dict(model="target", prompt="When the", max_tokens=12, temperature=1.0, seed=5)
    first = client.completions.create(**kw)  # type: ignore[call-overload]
    assert first.choices[0].text == client.completions.create(**kw).choices[0].text  # type: ignore[call-overload]
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(**kw, frequency_penalty=0.5)  # type: ignore[call-overload]
    assert info.value.body["param"] == "frequency_penalty"  # type: ignore[index]


def test_a_draft_with_another_tokenizer_is_refused(runs: tuple[Path, Path],
                                                   tmp_path: Path) -> None:
    target, draft = runs
    foreign = tmp_path / "foreign"
    shutil.copytree(draft, foreign)
    tok = Tokenizer.from_file(str(foreign / "tokenizer.json"))
    tok.add_special_tokens(["<|another|>"])
    tok.save(str(foreign / "tokenizer.json"))
    cfg = serve.Config(run=str(target), draft=str(foreign), port=free_port())
    with pytest.raises(UserError, match="^draft: .*another tokenizer"):
        serve.main(cfg)

"""Few-shot prompts of `lmforge eval --shots`: fixed-seed draws, never the row's own answer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmforge import cli
from lmforge.config import UserError
from lmforge.eval.fewshot import draw_shots, with_shots
from lmforge.evaluation import metrics as eval_metrics
from tests.serve import make_tiny_run


def test_draws_are_reproducible_distinct_and_never_the_row_itself() -> None:
    picks = draw_shots(n_rows=30, pool_size=30, k=4, seed=7, exclude_self=True)
    assert picks == draw_shots(30, 30, 4, seed=7, exclude_self=True)
    assert picks != draw_shots(30, 30, 4, seed=8, exclude_self=True)
    for i, row in enumerate(picks):
        assert len(set(row)) == 4 and i not in row and all(0 <= j < 30 for j in row)
    assert len({tuple(row) for row in picks}) > 1  # each row draws afresh
    other = draw_shots(5, pool_size=3, k=3, seed=0, exclude_self=False)
    assert all(sorted(row) == [0, 1, 2] for row in other)


def test_more_shots_than_examples_is_a_user_error() -> None:
    with pytest.raises(UserError, match="only 2 to draw from"):
        draw_shots(3, pool_size=3, k=3, seed=0, exclude_self=True)


def test_shots_become_earlier_turns_after_the_system_message() -> None:
    shot_a = [{"role": "system", "content": "ignored"}, {"role": "user", "content": "2+2?"},
              {"role": "assistant", "content": "4"}]
    shot_b = [{"role": "user", "content": "3+3?"}, {"role": "assistant", "content": "6"}]
    row = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "1+1?"}]
    got = with_shots(row, [shot_a, shot_b])
    assert [m["content"] for m in got] == ["Be brief.", "2+2?", "4", "3+3?", "6", "1+1?"]
    assert with_shots(row[1:], [shot_b]) == [*shot_b, row[1]]
    assert with_shots(row, []) == row


def test_eval_shots_put_other_rows_before_each_question(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    run = make_tiny_run(tmp_path, block_size=256)
    rows = [{"prompt": f"What is {i} plus {i}?", "completion": f"It is {2 * i}."}
            for i in range(1, 7)]
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    prompts: list[str] = []

    def answer(loaded: object, prompt: str, eot: str, max_new: int) -> str:
        prompts.append(prompt)
        return "It is 2."

    monkeypatch.setattr(eval_metrics, "_answer", answer)
    args = ["eval", str(run), "--data", str(data), "--shots", "2", "--seed", "5"]
    assert cli.run(args) == 0
    result = json.loads((run / "eval_qa.json").read_text())
    assert result["shots"] == 2 and result["examples"] == 6 and result["exact_match"] == 1 / 6
    for i, prompt in enumerate(prompts):
        shown = [k for k in range(6) if rows[k]["completion"] in prompt]
        assert len(shown) == 2 and i not in shown  # two other rows' answers, never its own
        assert prompt.rstrip().endswith("assistant") and rows[i]["prompt"] in prompt
    with pytest.raises(UserError, match="only 5 to draw from"):
        cli.run(["eval", str(run), "--data", str(data), "--shots", "6"])

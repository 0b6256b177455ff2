"""Few-shot prompts: K solved examples, drawn with a fixed seed, before each question.

Shots are whole example conversations placed as earlier turns of the chat (the harness's
"few-shot as multi-turn"), after the row's own system message if it has one, so the chat
template renders them the way the model saw dialogue in fine-tuning.
"""

from __future__ import annotations

import random

from lmforge.config import UserError


def draw_shots(n_rows: int, pool_size: int, k: int, seed: int,
               exclude_self: bool) -> list[list[int]]:
    """For each of ``n_rows`` rows, ``k`` distinct pool indices, reproducible from ``seed``.

    ``exclude_self``: the pool is the evaluated file, so row i never sees itself (the answer)
    among its shots.
    """
    room = pool_size - (1 if exclude_self else 0)
    if k > room:
        raise UserError(f"shots: {k} examples wanted but the shots file has only {room} to "
                        "draw from; lower --shots or give a larger --shots_file")
    rng = random.Random(seed)
    out = []
    for i in range(n_rows):
        picks = rng.sample(range(room), k)
        # Skip over the row itself by shifting the indices at or past it up by one.
        out.append([j + (1 if exclude_self and j >= i else 0) for j in picks])
    return out


def with_shots(messages: list[dict[str, str]],
               shots: list[list[dict[str, str]]]) -> list[dict[str, str]]:
    """``messages`` with the shot conversations (their system turns dropped) placed before
    its first non-system turn."""
    system = messages[:1] if messages and messages[0]["role"] == "system" else []
    turns = [m for shot in shots for m in shot if m["role"] != "system"]
    return [*system, *turns, *messages[len(system):]]

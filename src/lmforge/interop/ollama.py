"""An Ollama ``Modelfile`` beside a GGUF export, so ``ollama create NAME -f Modelfile`` works.

A Modelfile names the weights (``FROM ./NAME.Q5_K_M.gguf``), the prompt format (``TEMPLATE``,
a Go template over ``.Messages``, each with ``.Role`` and ``.Content``), a default system
prompt (``SYSTEM``) and sampling settings (``PARAMETER stop``, ``temperature``, ...).

A run's chat template is Jinja, which Go's templates cannot run. Most chat templates wrap each
message in a fixed prefix and suffix per role (ChatML, Llama 3, SmolLM2, Qwen), so we learn
those by rendering probe conversations through the Jinja template and reading the text around
each probe message; the Go template then writes the same wrappers. A template that does
something else (tools, content-dependent branches) is refused with the reason, checked by
rendering a longer conversation both ways.
"""

from __future__ import annotations

from dataclasses import dataclass

from lmforge.config import UserError
from lmforge.infer.chat import ChatTemplate

MODELFILE = "Modelfile"
_S, _U, _A = "lmforge-probe-system", "lmforge-probe-user", "lmforge-probe-reply"


@dataclass
class Wrappers:
    """The fixed text a chat template writes around each role's message."""

    start: str  # the BOS text the template writes first; llama.cpp adds BOS itself
    system: tuple[str, str]
    user: tuple[str, str]
    assistant: tuple[str, str]  # the prefix is also the generation prompt
    default_system: str | None  # what the template inserts when no system message is given


def _after(text: str, head: str, what: str, origin: str) -> str:
    if not text.startswith(head):
        raise UserError(f"chat template {origin}: {what} does not extend the shorter "
                        "conversation's text, so it has no Ollama TEMPLATE equivalent")
    return text[len(head):]


def _split(text: str, probe: str, origin: str) -> tuple[str, str]:
    if text.count(probe) != 1:
        raise UserError(f"chat template {origin}: a message's text does not appear once in "
                        "what it renders, so it has no Ollama TEMPLATE equivalent")
    before, after = text.split(probe)
    return before, after


def learn_wrappers(template: ChatTemplate) -> Wrappers:
    """Each role's prefix and suffix, read from renders of probe conversations."""
    o = template.origin
    sys_msg, user_msg = {"role": "system", "content": _S}, {"role": "user", "content": _U}
    reply = {"role": "assistant", "content": _A}
    a = template.render([sys_msg], add_generation_prompt=False)
    b = template.render([sys_msg, user_msg], add_generation_prompt=False)
    c = template.render([sys_msg, user_msg], add_generation_prompt=True)
    d = template.render([sys_msg, user_msg, reply], add_generation_prompt=False)
    start_and_prefix, sys_suffix = _split(a, _S, o)
    start = template.bos_token if template.bos_token and start_and_prefix.startswith(
        template.bos_token) else ""
    user = _split(_after(b, a, "a user message", o), _U, o)
    gen = _after(c, b, "the generation prompt", o)
    assistant = (gen, _after(_after(d, b + gen, "a reply", o), _A, "the reply's end", o))
    wrappers = Wrappers(start, (start_and_prefix[len(start):], sys_suffix), user, assistant,
                        None)
    plain = template.render([user_msg], add_generation_prompt=True)
    if plain != start + user[0] + _U + user[1] + gen:  # the template adds a system message
        head, _ = _split(plain, _U, o)
        sys_prefix = start + wrappers.system[0]
        inserted = _after(head, sys_prefix, "a conversation without a system message", o)
        tail = sys_suffix + user[0]
        if not inserted.endswith(tail):
            raise UserError(f"chat template {o}: without a system message it writes "
                            "something other than a default system message")
        wrappers.default_system = inserted[: len(inserted) - len(tail)]
    return wrappers


def go_template(w: Wrappers) -> str:
    """The Ollama (Go) template writing ``w``'s wrappers around .Messages.

    Plain ``{{ }}`` actions, never the trimming ``{{-``: the wrappers' own newlines must stay.
    """

    def branch(keyword: str, role: str, pair: tuple[str, str]) -> str:
        return f'{{{{ {keyword} eq .Role "{role}" }}}}{pair[0]}{{{{ .Content }}}}{pair[1]}'

    body = (branch("if", "system", w.system) + branch("else if", "user", w.user)
            + branch("else if", "assistant", w.assistant) + "{{ end }}")
    return f"{{{{ range .Messages }}}}{body}{{{{ end }}}}{w.assistant[0]}"


def render_go(w: Wrappers, messages: list[dict[str, str]]) -> str:
    """What ``go_template(w)`` renders for ``messages`` (Ollama appends the generation prompt):
    the check that the translation writes what the Jinja template does."""
    pairs = {"system": w.system, "user": w.user, "assistant": w.assistant}
    text = "".join(pairs[m["role"]][0] + m["content"] + pairs[m["role"]][1] for m in messages)
    return text + w.assistant[0]


def _quoted(text: str, what: str) -> str:
    if '"""' in text:
        raise UserError(f"{what} contains three double quotes, which a Modelfile cannot hold")
    return f'"""{text}"""'


def modelfile(gguf_file: str, template: ChatTemplate | None, stops: list[str],
              parameters: dict[str, float | int]) -> tuple[str, str | None]:
    """(the Modelfile text, why it has no TEMPLATE or None).

    ``stops`` are the strings that end a reply (EOS and end-of-turn tokens); ``parameters``
    Ollama's PARAMETER settings (temperature, top_k, num_ctx, ...).
    """
    lines = [f"FROM ./{gguf_file}"]
    skipped = None
    if template is not None:
        try:
            w = learn_wrappers(template)
            probe = [{"role": "system", "content": "S"}, {"role": "user", "content": "U1"},
                     {"role": "assistant", "content": "A1"}, {"role": "user", "content": "U2"}]
            if w.start + render_go(w, probe) != template.render(probe):
                raise UserError(f"chat template {template.origin}: a longer conversation "
                                "renders differently from its per-role wrappers")
            lines.append(f"TEMPLATE {_quoted(go_template(w), 'the chat template')}")
            if w.default_system is not None:
                lines.append(f"SYSTEM {_quoted(w.default_system, 'the default system prompt')}")
            stops = [*stops, *(s for s in [w.assistant[1].strip()] if s)]
        except UserError as e:
            skipped = str(e)
    lines += [f'PARAMETER stop "{s}"' for s in dict.fromkeys(stops) if s and '"' not in s]
    lines += [f"PARAMETER {k} {v}" for k, v in parameters.items()]
    return "\n".join(lines) + "\n", skipped

"""Chat templates: turn a list of messages into the prompt text a chat model was trained on.

A template is Jinja, as in Hugging Face's ``tokenizer_config.json``: it sees ``messages`` (a
list of ``{"role", "content"}``), ``add_generation_prompt``, ``bos_token`` and ``eos_token``.
It comes from a built-in by name (``chatml``), a ``.jinja`` file, or the run folder:
``chat_template.jinja``, else the ``chat_template`` of ``tokenizer_config.json`` (both kept by
``lmforge import``). Templates are other people's code, so they run in Jinja's immutable
sandbox: no attribute access to Python internals, no mutation of the messages we pass.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from lmforge.config import UserError
from lmforge.infer.engine import InvalidRequest

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# name -> (template, strings that end the assistant's turn)
BUILTIN: dict[str, tuple[str, tuple[str, ...]]] = {"chatml": (CHATML, ("<|im_end|>",))}
ROLES = ("system", "user", "assistant", "developer", "tool")
TEMPLATE_FILE = "chat_template.jinja"
TOKENIZER_CONFIG = "tokenizer_config.json"


@dataclass
class ChatTemplate:
    """A Jinja chat template and the strings around it."""

    source: str
    """The Jinja text."""
    origin: str
    """Where it came from (a built-in's name or a file), for messages."""
    bos_token: str = ""
    eos_token: str = ""
    stop: tuple[str, ...] = ()
    """Strings that end the assistant's turn, besides the model's EOS token."""

    @functools.cached_property
    def _compiled(self) -> Any:
        try:
            return _environment().from_string(self.source)
        except Exception as e:  # a TemplateSyntaxError: the file is at fault, not the request
            raise UserError(f"chat template {self.origin}: {type(e).__name__}: {e}") from None

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        """The prompt text for ``messages`` (checked first), ending where the reply begins."""
        checked = check_messages(messages)
        template = self._compiled
        try:
            return template.render(messages=checked, add_generation_prompt=add_generation_prompt,
                                   bos_token=self.bos_token, eos_token=self.eos_token)
        except InvalidRequest:
            raise
        except Exception as e:  # TemplateError, SecurityError, or a bug inside the template
            raise UserError(f"chat template {self.origin}: {type(e).__name__}: {e}") from None


def check_messages(messages: object) -> list[dict[str, str]]:
    """Messages as plain {"role", "content"} dicts; InvalidRequest naming the one at fault.

    ``content`` may be a string or OpenAI's list of ``{"type": "text", "text": ...}`` parts.
    """
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("messages", "must be a non-empty list of {role, content} objects")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise InvalidRequest(where, "must be an object with 'role' and 'content'")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise InvalidRequest(f"{where}.role", f"must be one of {', '.join(ROLES)}")
        if isinstance(content, list):
            content = _text_parts(content, f"{where}.content")
        if not isinstance(content, str):
            raise InvalidRequest(f"{where}.content", "must be a string or a list of text parts")
        out.append({"role": role, "content": content})
    return out


def _text_parts(parts: list[Any], where: str) -> str:
    texts = []
    for part in parts:
        if not (isinstance(part, dict) and part.get("type") == "text"
                and isinstance(part.get("text"), str)):
            raise InvalidRequest(where, "only {\"type\": \"text\", \"text\": ...} parts are supported")
        texts.append(part["text"])
    return "".join(texts)


def _raise(message: str) -> None:
    raise InvalidRequest("messages", f"rejected by the chat template: {message}")


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: Any = None, sort_keys: bool = False) -> str:
    # HF's own tojson: Jinja's built-in one HTML-escapes, which templates do not expect.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _environment() -> Any:
    """A sandboxed Jinja environment with the helpers HF chat templates rely on."""
    try:
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise UserError("chat templates need jinja2: pip install 'lmforge[serve]'") from None

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


# --------------------------------------------------------------------------- finding one


class NoChatTemplate(UserError):
    """The run folder has no chat template and none was named."""


def resolve_chat_template(run_dir: Path, name: str | None, eos_token: str,
                          fallback: str | None) -> ChatTemplate | None:
    """The one resolver: the template ``name``, else the run's own, else the built-in
    ``fallback`` (fine-tuning, eval: chatml), else None (serve: chat off). A broken template
    file is an error whatever the fallback: it is the user's to fix, not to paper over."""
    try:
        return load_chat_template(run_dir, name, eos_token)
    except NoChatTemplate:
        return None if fallback is None else load_chat_template(run_dir, fallback, eos_token)


def load_chat_template(run_dir: Path, name: str | None = None,
                       eos_token: str = "") -> ChatTemplate:
    """The template ``name`` (a built-in or a .jinja file), else the run folder's own.

    ``eos_token`` is the model's EOS text, used when tokenizer_config.json names none.
    """
    side = _read_side(run_dir)
    bos, eos = _token_text(side.get("bos_token")), _token_text(side.get("eos_token")) or eos_token
    if name:
        if name in BUILTIN:
            source, stop = BUILTIN[name]
            return ChatTemplate(source, name, bos, eos, stop)
        path = Path(name)
        if not path.is_file():
            raise UserError(f"template: {name!r} is neither a built-in ({', '.join(BUILTIN)}) "
                            "nor a .jinja file")
        return _from_text(path.read_text(encoding="utf-8"), str(path), bos, eos)
    path = run_dir / TEMPLATE_FILE
    if path.is_file():
        return _from_text(path.read_text(encoding="utf-8"), str(path), bos, eos)
    source = _from_tokenizer_config(side.get("chat_template"), run_dir / TOKENIZER_CONFIG)
    if source is None:
        raise NoChatTemplate(f"{run_dir}: has no chat template ({TEMPLATE_FILE} or chat_template in "
                        f"{TOKENIZER_CONFIG}); pass --template chatml or a .jinja file")
    return _from_text(source, str(run_dir / TOKENIZER_CONFIG), bos, eos)


def _from_text(source: str, origin: str, bos: str, eos: str) -> ChatTemplate:
    """A template read from a file, with the end-of-turn string it writes after a reply.

    A copy of a built-in (finetune saves one) keeps the built-in's stop; any other template is
    asked for its own (``end_of_turn``), so a run stops where its template ends a turn.
    """
    template = ChatTemplate(source, origin, bos, eos)
    builtin = next((stop for text, stop in BUILTIN.values() if text == source), None)
    template.stop = builtin if builtin is not None else end_of_turn(template)
    return template


PROBE_USER, PROBE_REPLY = "lmforge probe question", "lmforge probe reply"


def end_of_turn(template: ChatTemplate) -> tuple[str, ...]:
    """What the template writes right after an assistant reply, up to the first whitespace.

    Renders a probe conversation (one user turn, one reply) and takes the text after the
    reply: ``<|im_end|>`` for ChatML-style templates, ``<|eot_id|>`` for Llama 3, ``</s>`` for
    templates that end a reply with the EOS token. Whitespace-only (a template with no
    end-of-turn marker) or a template that cannot render the probe gives ().
    """
    messages = [{"role": "user", "content": PROBE_USER},
                {"role": "assistant", "content": PROBE_REPLY}]
    try:
        text = template.render(messages, add_generation_prompt=False)
    except (UserError, InvalidRequest):  # a broken template fails later, where it is used
        return ()
    at = text.rfind(PROBE_REPLY)
    if at < 0:
        return ()
    tail = text[at + len(PROBE_REPLY):].split()
    return (tail[0],) if tail else ()


def _read_side(run_dir: Path) -> dict[str, Any]:
    path = run_dir / TOKENIZER_CONFIG
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    return data if isinstance(data, dict) else {}


def _token_text(value: Any) -> str:
    """A special token as tokenizer_config.json writes it: a string or {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else ""


def _from_tokenizer_config(value: Any, where: Path) -> str | None:
    """HF's ``chat_template``: a string, or a list of {name, template} (we take "default")."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        if isinstance(named.get("default"), str):
            return named["default"]
    raise UserError(f"{where}: chat_template must be a string or a list with a 'default' entry")


def stop_token_ids(stop: tuple[str, ...], token_to_id: Any) -> tuple[int, ...]:
    """Ids of the stop strings that are one token of the vocabulary (e.g. ``<|im_end|>``).

    A tokenizer drops special tokens when it decodes, so a stop string that is a special token
    would never show up in the text: it has to be caught as a token id instead.
    """
    ids = (token_to_id(s) for s in stop)
    return tuple(i for i in ids if i is not None)


def chat_setup(run_dir: Path, name: str | None, tok: Any,
               eos_id: int | None) -> tuple[ChatTemplate, str]:
    """The chat template (named, the run's own, else ChatML) and its end-of-turn string.

    ``tok`` is the run's tokenizers.Tokenizer. Fine-tuning, ``lmforge data check`` and
    ``lmforge eval`` all render chats through this, so they agree on the template.
    """
    eos = tok.id_to_token(eos_id) if eos_id is not None else ""
    template = resolve_chat_template(run_dir, name, eos or "", "chatml")
    assert template is not None  # there is a fallback
    # template.stop comes with any template (a probe exchange is rendered through it)
    end_of_turn = template.stop[0] if template.stop else template.eos_token
    if not end_of_turn:
        raise UserError(f"chat template {template.origin}: no end-of-turn string is known (no "
                        "stop string, no eos_token); use --template chatml")
    return template, end_of_turn

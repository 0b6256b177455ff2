"""Chat templates: built-ins, run-folder files, HF parity, the sandbox, message checks."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

import lmforge
from lmforge import cli
from lmforge.checkpoint import TrainState, save_checkpoint
from lmforge.config import UserError, to_dict
from lmforge.data.corpora import pydoc_topics_text
from lmforge.data.tokenizer import train_bpe, vocab_size_of
from lmforge.infer.chat import (
    CHATML,
    ChatTemplate,
    check_messages,
    end_of_turn,
    load_chat_template,
    stop_token_ids,
)
from lmforge.infer.engine import InvalidRequest
from lmforge.models.decoder import Decoder, DecoderConfig
from tests.serve import LMFORGE, make_tiny_run

MESSAGES = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi!"},
            {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": "Who are you?"}]

# In the style of real HF templates: loop controls, raise_exception, bos_token, a system
# message pulled out of the list, tojson, whitespace control.
HF_STYLE = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
    "{% set messages = messages[1:] %}{% else %}{% set system = 'You are helpful.' %}{% endif %}"
    "<<SYS>>{{ system | tojson }}<</SYS>>\n"
    "{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant') }}"
    "{% endif %}"
    "{% if loop.index0 > 8 %}{% break %}{% endif %}"
    "{{ '[' + message['role'] | upper + '] ' + message['content'] | trim }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}[ASSISTANT] {% endif %}"
)


# SmolLM2-Instruct's own template (ChatML with a default system prompt): what `lmforge import`
# keeps and what `lmforge finetune` saves again in the tuned run. Not a copy of the built-in.
SMOL_STYLE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant.<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
LLAMA3_STYLE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + "
    "message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{% endif %}"
)


def test_chatml_renders_the_standard_layout() -> None:
    template = ChatTemplate(CHATML, "chatml")
    assert template.render(MESSAGES[:2]) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert template.render(MESSAGES[:2], add_generation_prompt=False).endswith("<|im_end|>\n")


def test_builtin_by_name_has_its_stop_string(tmp_path: Path) -> None:
    template = load_chat_template(tmp_path, "chatml")
    assert template.stop == ("<|im_end|>",) and template.source == CHATML


def test_run_folder_template_file_wins_over_tokenizer_config(tmp_path: Path) -> None:
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": "from config", "bos_token": {"content": "<s>"}, "eos_token": "</s>"}))
    template = load_chat_template(tmp_path)
    assert template.render(MESSAGES) == "from config"
    assert (template.bos_token, template.eos_token) == ("<s>", "</s>")
    (tmp_path / "chat_template.jinja").write_text("from file {{ bos_token }}")
    assert load_chat_template(tmp_path).render(MESSAGES) == "from file <s>"


def test_a_saved_copy_of_a_builtin_keeps_its_stop_string(tmp_path: Path) -> None:
    (tmp_path / "chat_template.jinja").write_text(CHATML)
    assert load_chat_template(tmp_path).stop == ("<|im_end|>",)
    (tmp_path / "chat_template.jinja").write_text(CHATML + " ")  # not a copy: asked instead
    assert load_chat_template(tmp_path).stop == ("<|im_end|>",)


@pytest.mark.parametrize(("source", "eos", "stop"), [
    (SMOL_STYLE, "<|im_end|>", ("<|im_end|>",)),
    (LLAMA3_STYLE, "<|end_of_text|>", ("<|eot_id|>",)),
    (HF_STYLE, "</s>", ("</s>",)),  # a reply ends with the EOS token
    ("{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}",
     "</s>", ()),  # no end-of-turn marker at all
    ("{% for %}", "</s>", ()),  # broken: the error comes when it is used, not at load
])
def test_any_template_brings_its_own_end_of_turn(tmp_path: Path, source: str, eos: str,
                                                 stop: tuple[str, ...]) -> None:
    (tmp_path / "chat_template.jinja").write_text(source)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": eos}))
    template = load_chat_template(tmp_path)
    assert template.stop == stop
    assert end_of_turn(template) == stop


def test_tokenizer_config_list_form_uses_default(tmp_path: Path) -> None:
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": [
        {"name": "tool_use", "template": "tools"}, {"name": "default", "template": "plain"}]}))
    assert load_chat_template(tmp_path).render(MESSAGES) == "plain"


def test_no_template_says_how_to_fix(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="--template chatml"):
        load_chat_template(tmp_path)
    with pytest.raises(UserError, match="neither a built-in"):
        load_chat_template(tmp_path, "no-such-template")


def test_eos_token_falls_back_to_the_models_eos(tmp_path: Path) -> None:
    template = load_chat_template(tmp_path, "chatml", eos_token="<|endoftext|>")
    assert template.eos_token == "<|endoftext|>"


def test_same_text_as_transformers_apply_chat_template() -> None:
    transformers = pytest.importorskip("transformers")
    from lmforge.data.tokenizer import train_bpe

    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=train_bpe(["hello world"] * 10, 300), bos_token="<s>", eos_token="</s>")
    for source in (CHATML, HF_STYLE):
        tok.chat_template = source
        ours = ChatTemplate(source, "test", bos_token="<s>", eos_token="</s>")
        for messages in (MESSAGES, MESSAGES[1:3], [{"role": "user", "content": "ünï \"q\""}]):
            for gen in (True, False):
                theirs = tok.apply_chat_template(messages, tokenize=False,
                                                 add_generation_prompt=gen)
                assert ours.render(messages, add_generation_prompt=gen) == theirs


def test_raise_exception_is_a_bad_request() -> None:
    template = ChatTemplate(HF_STYLE, "test")
    with pytest.raises(InvalidRequest, match="must alternate") as info:
        template.render([{"role": "assistant", "content": "first?"}])
    assert info.value.param == "messages"


@pytest.mark.parametrize("source", [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ messages.append({'role': 'user', 'content': 'x'}) }}",
    "{{ cycler.__init__.__globals__ }}",
])
def test_sandbox_refuses_unsafe_templates(source: str) -> None:
    with pytest.raises(UserError, match="SecurityError"):
        ChatTemplate(source, "evil").render(MESSAGES)


def test_syntax_error_names_the_template() -> None:
    with pytest.raises(UserError, match="broken.jinja"):
        ChatTemplate("{% for %}", "broken.jinja").render(MESSAGES)


@pytest.mark.parametrize(("messages", "param"), [
    ("hello", "messages"),
    ([], "messages"),
    (["hello"], "messages[0]"),
    ([{"role": "wizard", "content": "x"}], "messages[0].role"),
    ([{"role": "user"}], "messages[0].content"),
    ([{"role": "user", "content": 3}], "messages[0].content"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}],
     "messages[0].content"),
])
def test_bad_messages_name_the_field(messages: object, param: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        check_messages(messages)
    assert info.value.param == param


def test_text_parts_are_joined() -> None:
    parts = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    assert check_messages([{"role": "user", "content": parts}]) == [
        {"role": "user", "content": "ab"}]


def test_stop_strings_that_are_one_token_become_ids() -> None:
    vocab = {"<|im_end|>": 7}
    assert stop_token_ids(("<|im_end|>", "\n\n"), vocab.get) == (7,)


# --------------------------------------------------------------------------- `lmforge chat`


def run_chat(run: Path, stdin: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*LMFORGE, "chat", "--run", str(run), "--temperature", "0",
                           "--max_new_tokens", "12", *args], input=stdin, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_chat_command_streams_replies_keeps_history_and_resets(tmp_path: Path) -> None:
    run = make_tiny_run(tmp_path)
    lm = lmforge.load(run)
    first = lm.chat("What is a list?", max_new_tokens=12, temperature=0.0)
    follow = [{"role": "user", "content": "What is a list?"},
              {"role": "assistant", "content": first}, {"role": "user", "content": "And?"}]
    second = lm.chat(follow, max_new_tokens=12, temperature=0.0)
    assert second != lm.chat("And?", max_new_tokens=12, temperature=0.0)  # history matters
    proc = run_chat(run, "What is a list?\nAnd?\n/reset\nWhat is a list?\n/exit\nignored\n")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert out.count(first) >= 2 and second in out  # the reply after /reset starts afresh
    assert out.index(first) < out.index(second) < out.index("(conversation cleared)")
    assert "ignored" not in out  # nothing is read after /exit


def test_chat_command_without_a_template_is_one_line_error(tmp_path: Path) -> None:
    run = make_tiny_run(tmp_path, chat_template=False)
    proc = run_chat(run, "hi\n")
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "--template chatml" in proc.stderr
    reply = lmforge.load(run, template="chatml").chat("hi", max_new_tokens=3)  # the fix works
    assert isinstance(reply, str)


# --------------------------------------------------------------------------- stop after finetune


def forced_run(root: Path, template: str) -> tuple[Path, str]:
    """A run whose greedy model answers one token, then ``<|im_end|>``, then that token again.

    The blocks are zeroed to identities, so the logits depend on the current token only:
    the prompt's last token -> WORD -> <|im_end|> -> WORD -> ... The tokenizer's EOS is
    <|endoftext|>, not <|im_end|>: only the template's end of turn can stop the reply.
    Returns the run and WORD's text.
    """
    tok = train_bpe([t for _, t in sorted(pydoc_topics_text().items())[:20]], vocab_size=300)
    tok.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    cfg = DecoderConfig(vocab_size=vocab_size_of(tok), block_size=128, n_layer=1, n_head=2,
                        n_embd=64, tie_embeddings=False)
    model = Decoder(cfg)
    model.init_weights(torch.Generator().manual_seed(0))
    prompt = ChatTemplate(template, "t").render([{"role": "user", "content": "Hi"}])
    last, word = tok.encode(prompt).ids[-1], tok.token_to_id("a")
    eot = tok.token_to_id("<|im_end|>")
    with torch.no_grad():
        for block in model.blocks:
            block.attn.o_proj.weight.zero_()
            block.mlp.down_proj.weight.zero_()
        e = torch.nn.functional.rms_norm(model.tok_emb.weight, (cfg.n_embd,))  # what the head sees
        model.lm_head.weight.zero_()
        model.lm_head.weight[word] = 10 * (e[last] + e[eot])
        model.lm_head.weight[eot] = 10 * e[word]
    run = root / "forced"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({"model": to_dict(cfg)}), encoding="utf-8")
    tok.save(str(run / "tokenizer.json"))
    save_checkpoint(run, TrainState(step=1), model, None)
    (run / "chat_template.jinja").write_text(template, encoding="utf-8")
    return run, tok.decode([word])


def test_chat_stops_at_the_end_of_turn_of_a_non_builtin_template(tmp_path: Path) -> None:
    run, word = forced_run(tmp_path, SMOL_STYLE)
    lm = lmforge.load(run)
    assert lm.template.stop == ("<|im_end|>",)
    prompt = lm.template.render([{"role": "user", "content": "Hi"}])
    assert lm.generate(prompt, max_new_tokens=5, temperature=0.0) == word * 3  # no stop: on
    assert lm.chat("Hi", max_new_tokens=5, temperature=0.0) == word  # stopped at <|im_end|>


def test_finetuned_run_stops_at_its_templates_end_of_turn(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    base, word = forced_run(tmp_path / "runs", SMOL_STYLE)
    rows = [{"prompt": f"q{i}", "completion": "the"} for i in range(8)]
    (tmp_path / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.chdir(tmp_path)
    assert cli.run(["finetune", "--run", str(base), "--data", "qa.jsonl", "--out", "ft",
                    "--method", "lora", "--val_fraction", "0", "--train.max_steps", "2",
                    "--train.batch_size", "4", "--train.threads", "1", "--optim.lr", "1e-6",
                    "--optim.warmup_steps", "0"]) == 0
    tuned = tmp_path / "runs" / "ft"
    assert (tuned / "chat_template.jinja").read_text() == SMOL_STYLE
    lm = lmforge.load(tuned)
    assert lm.template.stop == ("<|im_end|>",)
    assert lm.chat("Hi", max_new_tokens=5, temperature=0.0) == word


def test_one_resolver_falls_back_only_when_the_run_has_no_template(tmp_path: Path) -> None:
    from lmforge.infer.chat import NoChatTemplate, load_chat_template, resolve_chat_template

    with pytest.raises(NoChatTemplate, match="has no chat template"):
        load_chat_template(tmp_path)
    assert resolve_chat_template(tmp_path, None, "</s>", None) is None  # serve: chat off
    chatml = resolve_chat_template(tmp_path, None, "</s>", "chatml")  # fine-tune, eval
    assert chatml is not None and chatml.origin == "chatml"
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    for fallback in (None, "chatml"):  # a broken file is the user's to fix, never skipped
        with pytest.raises(UserError, match="not valid JSON"):
            resolve_chat_template(tmp_path, None, "</s>", fallback)

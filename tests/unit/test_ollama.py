"""The Ollama Modelfile of a GGUF export: TEMPLATE translated from the run's Jinja template."""

from __future__ import annotations

import pytest

from lmforge.infer.chat import CHATML, ChatTemplate
from lmforge.interop.ollama import learn_wrappers, modelfile, render_go

# SmolLM2-135M-Instruct's own template (from its GGUF): ChatML plus a default system message.
SMOLLM2 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + "
    "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\\n' }}{% endif %}")
# Llama 3's format, BOS written by the template.
LLAMA3 = (
    "{{- bos_token }}{%- for message in messages %}{{- '<|start_header_id|>' + message['role'] "
    "+ '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{%- endif %}")
CONVERSATION = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hi!\nTwo lines."},
                {"role": "assistant", "content": "Hello."},
                {"role": "user", "content": "What is 2+2?"}]


def test_chatml_modelfile_is_exact() -> None:
    text, skipped = modelfile("m.Q5_K_M.gguf", ChatTemplate(CHATML, "chatml"), ["<|endoftext|>"],
                              {"num_ctx": 2048})
    assert skipped is None
    assert text == (
        'FROM ./m.Q5_K_M.gguf\n'
        'TEMPLATE """{{ range .Messages }}{{ if eq .Role "system" }}<|im_start|>system\n'
        '{{ .Content }}<|im_end|>\n'
        '{{ else if eq .Role "user" }}<|im_start|>user\n'
        '{{ .Content }}<|im_end|>\n'
        '{{ else if eq .Role "assistant" }}<|im_start|>assistant\n'
        '{{ .Content }}<|im_end|>\n'
        '{{ end }}{{ end }}<|im_start|>assistant\n'
        '"""\n'
        'PARAMETER stop "<|endoftext|>"\n'
        'PARAMETER stop "<|im_end|>"\n'
        'PARAMETER num_ctx 2048\n')


@pytest.mark.parametrize("source", [CHATML, SMOLLM2, LLAMA3])
def test_wrappers_render_what_the_jinja_template_does(source: str) -> None:
    template = ChatTemplate(source, "t", "<|begin_of_text|>", "<|end_of_text|>")
    w = learn_wrappers(template)
    for n in range(1, len(CONVERSATION) + 1):
        if CONVERSATION[n - 1]["role"] == "assistant":
            continue
        assert w.start + render_go(w, CONVERSATION[:n]) == template.render(CONVERSATION[:n])


def test_a_default_system_prompt_becomes_system() -> None:
    text, _ = modelfile("m.gguf", ChatTemplate(SMOLLM2, "smollm2"), [], {})
    assert 'SYSTEM """You are a helpful AI assistant named SmolLM, trained by Hugging Face"""' \
        in text.splitlines()


def test_bos_is_left_to_the_runtime() -> None:
    text, _ = modelfile("m.gguf", ChatTemplate(LLAMA3, "llama3", "<|begin_of_text|>"),
                        ["<|end_of_text|>"], {})
    assert "<|begin_of_text|>" not in text
    assert 'PARAMETER stop "<|eot_id|>"' in text and 'PARAMETER stop "<|end_of_text|>"' in text


def test_a_template_with_branches_on_content_is_not_translated() -> None:
    odd = ("{% for m in messages %}{% if loop.index > 2 %}[late]{% endif %}<{{ m['role'] }}>"
           "{{ m['content'] }}</s>{% endfor %}{% if add_generation_prompt %}<assistant>"
           "{% endif %}")
    text, skipped = modelfile("m.gguf", ChatTemplate(odd, "odd.jinja"), ["</s>"], {})
    assert skipped is not None and "odd.jinja" in skipped and "\n" not in skipped
    assert "TEMPLATE" not in text and text.startswith("FROM ./m.gguf\n")

"""Ollama Modelfile: ChatML templates become a Go TEMPLATE (with the default system prompt), others are left out."""

from __future__ import annotations

import pytest

from pistill.export.modelfile import CHATML_TEMPLATE, chatml, chatml_system, for_folder, modelfile
from pistill.export.verify import CONVERSATIONS, render_chat

SMOLLM2 = (  # SmolLM2-Instruct's template: ChatML with a default system prompt
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA2 = ("{% for m in messages %}{% if m['role'] == 'user' %}{{ bos_token + '[INST] ' + m['content'] + ' [/INST]' }}"
          "{% else %}{{ ' ' + m['content'] + eos_token }}{% endif %}{% endfor %}")


def _render(template):
    return lambda messages: render_chat(template, messages, "<s>", "</s>")


@pytest.mark.parametrize("template, is_chatml, system", [
    (SMOLLM2, True, "You are a helpful AI assistant named SmolLM, trained by Hugging Face"),
    (SMOLLM2.replace("system\nYou are", "system\nYou were"), True, "You were a helpful AI assistant named SmolLM, "
                                                                  "trained by Hugging Face"),
    (SMOLLM2.replace("{% if loop.first", "{% if false and loop.first"), True, None),
    (SMOLLM2.replace("'<|im_end|>' + '\n'", "'<|im_end|>'"), False, None),  # no newline after a turn
    (LLAMA2, False, None),
])
def test_chatml_detection(template, is_chatml, system):
    got_chatml, got_system = chatml_system(_render(template), CONVERSATIONS)
    assert got_chatml == is_chatml
    if is_chatml:
        assert got_system == system


def test_chatml_mirror_of_the_go_template():
    """`chatml` is what CHATML_TEMPLATE renders (checked against Go's text/template while writing it): every turn
    closed by <|im_end|>, a generation prompt after a non-assistant turn, SYSTEM first when none is given."""
    msgs = [{"role": "user", "content": "hi"}]
    assert chatml(msgs, "S") == ("<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
                                 "<|im_start|>assistant\n")
    assert chatml([{"role": "system", "content": "T"}, *msgs], "S").startswith("<|im_start|>system\nT<|im_end|>")
    assert ".Messages" in CHATML_TEMPLATE and "<|im_start|>assistant" in CHATML_TEMPLATE


def test_modelfile_for_the_tiny_model(tiny_model):
    text = for_folder(tiny_model, "model-Q4_0.gguf", 512)
    assert text == "\n".join(["FROM ./model-Q4_0.gguf", "", f'TEMPLATE """{CHATML_TEMPLATE}"""', "",
                              'PARAMETER stop "<|im_end|>"', 'PARAMETER stop "<|im_start|>"',
                              "PARAMETER num_ctx 512", ""])


def test_modelfile_with_system_and_without_template():
    text = modelfile("m.gguf", True, "Be brief.", ["<|im_end|>"], 2048)
    assert 'SYSTEM """Be brief."""' in text and "TEMPLATE" in text
    text = modelfile("m.gguf", False, None, ["</s>"], 4096)
    assert "TEMPLATE \"\"\"" not in text and "# chat template is not ChatML" in text
    assert text.endswith('PARAMETER stop "</s>"\nPARAMETER num_ctx 4096\n')
    with pytest.raises(ValueError, match="triple quotes"):
        modelfile("m.gguf", True, 'say """', [], 1)

"""Ollama Modelfile beside a GGUF: FROM, the chat template as a Go TEMPLATE (ChatML), default SYSTEM, stop, num_ctx."""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
# Ollama's ChatML template (Go text/template over .Messages; a final assistant message is left open for prefill)
CHATML_TEMPLATE = """{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 -}}
<|im_start|>{{ .Role }}
{{ .Content }}{{ if not $last }}<|im_end|>
{{ end }}
{{- if and (ne .Role "assistant") $last }}<|im_end|>
<|im_start|>assistant
{{ end }}
{{- end }}"""


def chatml(messages: list[dict], system: str | None) -> str:
    """What CHATML_TEMPLATE renders for messages ending in a non-assistant turn, after Ollama has put the Modelfile's
    SYSTEM first when the request has no system message."""
    if system and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system}, *messages]
    return "".join(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in messages) + f"{IM_START}assistant\n"


def default_system(render) -> str | None:
    """The system prompt a template inserts when the conversation has none (SmolLM2 does), or None."""
    text = render([{"role": "user", "content": "x"}])
    head = f"{IM_START}system\n"
    if text.startswith(head) and IM_END in text:
        return text[len(head): text.index(IM_END)]
    return None


def chatml_system(render, conversations) -> tuple[bool, str | None]:
    """(whether `render(messages) -> prompt` is ChatML on every conversation, its default system prompt)."""
    system = default_system(render)
    return all(render(list(c)) == chatml(list(c), system) for c in conversations), system


def _quote(text: str) -> str:
    if '"""' in text:
        raise ValueError(f"cannot write {text[:40]!r}... into a Modelfile: it contains triple quotes")
    return f'"""{text}"""'


def modelfile(gguf_name: str, is_chatml: bool, system: str | None, stops: list[str], num_ctx: int) -> str:
    """Modelfile text for `ollama create NAME -f Modelfile`, run in the folder that holds `gguf_name`."""
    lines = [f"FROM ./{gguf_name}", ""]
    if is_chatml:
        lines += [f"TEMPLATE {_quote(CHATML_TEMPLATE)}", ""]
        if system:
            lines += [f"SYSTEM {_quote(system)}", ""]
    else:  # Ollama then matches the GGUF's tokenizer.chat_template against the templates it knows
        lines += ["# chat template is not ChatML: no TEMPLATE here; ollama detects one from the GGUF metadata", ""]
    lines += [f'PARAMETER stop "{s}"' for s in stops]
    lines += [f"PARAMETER num_ctx {num_ctx}", ""]
    return "\n".join(lines)


def for_folder(folder, gguf_name: str, num_ctx: int) -> str:
    """The Modelfile for a GGUF exported from the HF folder `folder`: ChatML TEMPLATE and default SYSTEM when the
    folder's chat template renders CONVERSATIONS exactly as ChatML, stops at its end-of-turn and eos tokens."""
    from transformers import AutoTokenizer

    from .verify import CONVERSATIONS

    tok = AutoTokenizer.from_pretrained(folder)
    is_chatml, system = False, None
    if tok.chat_template:
        render = lambda m: tok.apply_chat_template(m, add_generation_prompt=True, tokenize=False)  # noqa: E731
        is_chatml, system = chatml_system(render, CONVERSATIONS)
    if tok.chat_template and not is_chatml:
        log.warning("chat template is not ChatML; the Modelfile leaves TEMPLATE to ollama's own detection")
    stops = [IM_END, IM_START] if is_chatml else []
    stops += [tok.eos_token] if tok.eos_token and tok.eos_token not in stops else []
    return modelfile(gguf_name, is_chatml, system, stops, num_ctx)

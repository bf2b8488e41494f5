"""The chat template of a GGUF export: a portable copy for the file, and an Ollama `Modelfile` beside it.

    plan = chat_plan(tokenizer, system_prompt, add_bos)   # checks the template, raises UserError if untranslatable
    text = modelfile_text("lumi-q8_0.gguf", plan)          # FROM / TEMPLATE / PARAMETER stop / SYSTEM

Ollama does not run the Jinja chat template inside a GGUF; it renders the Modelfile's Go `TEMPLATE`.
A TEMPLATE that differs from the training template by a newline is the usual cause of a fine-tune that
"talks gibberish" in Ollama, so the TEMPLATE is not guessed from the model's name: the Jinja template
is rendered on probe conversations and must equal, character for character, what the Go template
written here renders for them (ChatML: `<|im_start|>role\\n...<|im_end|>\\n`, then
`<|im_start|>assistant\\n`). Anything else is refused with one line.

The BOS token: transformers renders the template and tokenizes it without adding specials, while
llama.cpp / Ollama add BOS themselves when the GGUF says `add_bos_token`. So a template's literal BOS
goes into the TEMPLATE only when the tokenizer does not add one. A default system prompt the template
injects (SmolLM2's) becomes the Modelfile's SYSTEM, unless the model dir saved its own (assistant.json),
which the app uses and so does the Modelfile.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from inference.errors import UserError

START, END = "<|im_start|>", "<|im_end|>"
MODELFILE_HEADER = "# Modelfile for Ollama, written by `python -m trainer export-gguf`"
# Go text/template, as Ollama renders it: .Messages holds the conversation, SYSTEM already prepended
GO_BODY = ("{{- range .Messages }}" + START + "{{ .Role }}\n{{ .Content }}" + END + "\n{{ end }}"
           + START + "assistant\n")
# {% generation %} markers only tell training which tokens carry loss; llama.cpp's Jinja engine
# does not know them, so the copy in the GGUF goes without
_GENERATION_TAG = re.compile(r"\{%-?\s*(end)?generation\s*-?%\}")

PROBES = [
    [{"role": "user", "content": "Who are you?"}],
    [{"role": "system", "content": "You are Lumi."}, {"role": "user", "content": "你好，你是谁？"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"},
     {"role": "assistant", "content": "4."}, {"role": "user", "content": " Line one\nline two \n"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!\n\nHow can I help?"},
     {"role": "user", "content": "写一首诗"}],
]


@dataclass
class ChatPlan:
    template: str                  # the Go TEMPLATE
    system: str | None             # SYSTEM: the saved prompt, else the one the Jinja template injects
    stops: list[str]


def portable_template(tokenizer) -> str | None:
    """The chat template for the GGUF: without training-only {% generation %} markers when it renders
    the same without them (checked on the probes), else as it is."""
    original = tokenizer.chat_template
    if not original or not _GENERATION_TAG.search(original):
        return original
    stripped = _GENERATION_TAG.sub("", original)
    for conv in PROBES:
        a = tokenizer.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
        b = tokenizer.apply_chat_template(conv, tokenize=False, add_generation_prompt=True, chat_template=stripped)
        if a != b:
            return original
    return stripped


def go_render(prefix: str, messages: list[dict]) -> str:
    """What GO_BODY (after `prefix`) renders for `messages`: the Python twin used for the check."""
    return prefix + "".join(f"{START}{m['role']}\n{m['content']}{END}\n" for m in messages) + f"{START}assistant\n"


def _refuse(why: str) -> UserError:
    return UserError(f"the chat template is not plain ChatML ({why}) -- the Ollama TEMPLATE is written for "
                     f"ChatML only; pass --no-modelfile to export the GGUF alone")


def chat_plan(tokenizer, system_prompt: str | None, add_bos: bool, stop_ids=()) -> ChatPlan:
    """Translate the tokenizer's chat template to Ollama's, or refuse in one line."""
    if not tokenizer.chat_template:
        raise UserError("the tokenizer has no chat template -- export a chat model, or pass --no-modelfile")

    def jinja(conv):
        return tokenizer.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)

    first = jinja(PROBES[0])
    if START not in first:
        raise _refuse(f"no {START} in {first[:60]!r}")
    prefix = first[:first.index(START)]
    bos = tokenizer.bos_token or ""
    go_prefix = prefix[len(bos):] if add_bos and bos and prefix.startswith(bos) else prefix
    if "{{" in go_prefix:
        raise _refuse(f"prefix {prefix!r}")
    # a system turn the template writes by itself when the conversation has none
    default = None
    head = first[len(prefix):]
    if head.startswith(f"{START}system\n"):
        default = head[len(f"{START}system\n"):].split(END, 1)[0]
    for conv in PROBES:
        with_default = conv if conv[0]["role"] == "system" or default is None else \
            [{"role": "system", "content": default}, *conv]
        want = jinja(conv)
        got = (bos if go_prefix != prefix else "") + go_render(go_prefix, with_default)
        if want != got:
            at = next((i for i, (x, y) in enumerate(zip(want, got)) if x != y), min(len(want), len(got)))
            raise _refuse(f"it renders {want[max(0, at - 20):at + 20]!r} where ChatML has {got[max(0, at - 20):at + 20]!r}")
    system = system_prompt if system_prompt else default
    if system and '"""' in system:
        raise UserError('the system prompt contains """, which a Modelfile cannot quote -- change the prompt')
    stops = [END]
    for i in stop_ids:
        tok = tokenizer.convert_ids_to_tokens(int(i))
        if tok and tok not in stops and tok in tokenizer.all_special_tokens:
            stops.append(tok)
    return ChatPlan(go_prefix + GO_BODY, system, stops)


def modelfile_text(gguf_name: str, plan: ChatPlan) -> str:
    lines = [MODELFILE_HEADER, f"# ollama create NAME -f Modelfile && ollama run NAME", f"FROM ./{gguf_name}",
             f'TEMPLATE """{plan.template}"""']
    lines += [f'PARAMETER stop "{s}"' for s in plan.stops]
    if plan.system:
        lines.append(f'SYSTEM """{plan.system}"""')
    return "\n".join(lines) + "\n"

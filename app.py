"""The chat app (a Gradio Space): fetch the model, load it on the best device, stream its answers.

    MODEL_REPO=https://code.openxlab.org.cn/USER/REPO.git python app.py   # git clone + git lfs pull, once
    MODEL_REPO=USER/REPO python app.py                                    # a Hugging Face model repo
    MODEL_PATH=merged/ python app.py                                      # a local model dir
    python app.py                                                         # the untuned tiny demo base

Configuration is the environment (a Space sets variables and secrets, not flags):
- `MODEL_REPO`: any git remote or Hugging Face id, cloned into `$OWN_ASSISTANT_CACHE/repos`
  (see inference/fetch.py); `MODEL_REPO_TOKEN`: its token when private (never logged or stored).
  `space_config.json` beside this file (written by `python -m publish app`) presets MODEL_REPO.
- `MODEL_PATH`: a local model dir instead. Setting both is an error.
- `GRADIO_SERVER_NAME` / `GRADIO_SERVER_PORT`: where to listen (gradio's own; default 127.0.0.1:7860).

A multimodal model (a merged LLaVA dir from `mm-export --merge`, or an mm-train final/ / mm-export adapter
dir: see inference/image_chat.py `load_served`) gets an image input: the message box takes an image
(📎), the chat is about the newest image of the conversation, and the API's `message` is
`{"text": ..., "files": [handle_file(PATH)]}`. Text models keep the plain text box (`message` a string).

The model runs on CUDA bf16/fp16, in 4-bit when the GPU is too small and bitsandbytes is there, else
on the CPU (inference/loader.py); the page shows which. The default system prompt is the one saved
with the model at training time. A model that cannot be loaded does not crash the app: the reason
is logged and shown on the page, and every chat answer repeats it.

`demo` is built at import (tests and `gradio app.py` import it); it launches only under __main__.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import gradio as gr

from inference import ChatEngine, load
from inference.engine import SERVING_BATCH
from inference.fetch import fetch, parse_source
from inference.gguf_import import embedded_base
from inference.errors import UserError

log = logging.getLogger("own_assistant.app")
SPACE_CONFIG = Path(__file__).resolve().parent / "space_config.json"
EXAMPLES = ["你是谁？", "Who are you?", "请做一下自我介绍", "What is 3 plus 4?"]
TEMPERATURE, TOP_P, MAX_NEW_TOKENS = 0.3, 0.9, 256
CONCURRENCY = 4          # chats generating at once; the engine's lock still runs one `generate` at a time
QUEUE_SIZE = 64          # waiting chats beyond this are refused instead of piling up


@dataclass
class Backend:
    """What the UI serves: an engine, or the reason there is none."""
    engine: ChatEngine | None
    system_prompt: str
    note: str                     # markdown shown on the page: where the model came from, where it runs
    error: str | None = None
    multimodal: bool = False      # a LLaVA model: the UI takes images, the engine is an ImageChatEngine


def model_source(env) -> tuple[str, str]:
    """("repo", MODEL_REPO) | ("path", MODEL_PATH) | ("default", "")."""
    repo, path = env.get("MODEL_REPO", "").strip(), env.get("MODEL_PATH", "").strip()
    if repo and path:
        raise UserError("both MODEL_REPO and MODEL_PATH are set -- set only one of them")
    if repo:
        return "repo", repo
    if path:
        return "path", path
    if SPACE_CONFIG.is_file():
        try:
            preset = json.loads(SPACE_CONFIG.read_text(encoding="utf-8")).get("MODEL_REPO")
        except (ValueError, AttributeError):
            raise UserError(f"{SPACE_CONFIG}: not a JSON object -- expected {{\"MODEL_REPO\": \"...\"}}") from None
        if preset:
            return "repo", preset
    return "default", ""


def start(env=None) -> Backend:
    """Fetch and load the configured model; a failure becomes a Backend that explains itself."""
    env = os.environ if env is None else env
    try:
        kind, value = model_source(env)
        if kind == "repo":
            model_dir = fetch(value, token=env.get("MODEL_REPO_TOKEN") or None)
            source = f"`{parse_source(value)[0]}`"
        elif kind == "path":
            model_dir = Path(value).expanduser()
            source = f"`{model_dir}`"
        else:
            model_dir = embedded_base()
            source = ("**the untuned embedded base** (SmolLM2-135M-Instruct; it calls itself SmolLM) -- set "
                      "`MODEL_REPO` or `MODEL_PATH` to serve your own assistant")
        from inference.image_chat import LoadedLlava, load_served
        loaded = load_served(model_dir) or load(model_dir)
        # building the engine is part of starting: the batcher and the CUDA decoder allocate here
        engine = loaded.engine(max_batch=SERVING_BATCH)
    except UserError as exc:
        return failed(one_line(str(exc)))
    except Exception as exc:  # noqa: BLE001 -- a bad model must not take the page down; the log keeps the trace
        log.exception("loading the model failed")
        return failed(one_line(f"{type(exc).__name__}: {exc}"))
    log.info("serving %s", loaded.note)
    multimodal = isinstance(loaded, LoadedLlava)
    note = f"**Model:** {source}  \n**Running on:** {loaded.note}"
    if multimodal:
        note += "  \n**Images:** attach one with 📎; the chat is about the newest image"
    engine.warm_up()          # compile (CUDA graph, CPU step) now, not on the first visitor's turn
    return Backend(engine, loaded.system_prompt or "", note, multimodal=multimodal)


def one_line(text: str) -> str:
    """The page and the chat answer show one line: the first non-empty one (a CUDA error's advice and
    a library's multi-line message stay in the log)."""
    return next((line.strip() for line in text.splitlines() if line.strip()), text.strip() or "unknown error")


def failed(reason: str) -> Backend:
    log.error("model not loaded: %s", reason)
    return Backend(None, "", f"⚠️ **Model not loaded:** {reason}",
                   error=f"⚠️ The model could not be loaded: {reason}")


def text_of(content) -> str:
    """gradio 6 history content is a string or a list of typed parts; the model sees the text."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return content.get("text", "")
    return "".join(text_of(part) for part in content or [])


def files_of(content) -> list[str]:
    """Paths of the files in a message: a multimodal message ({"text", "files"}) or gradio 6 history
    content, whose file parts are {"path"} (as ChatInterface stores them) or {"type": "file", "file"}."""
    if isinstance(content, dict):
        if "files" in content:
            return [f if isinstance(f, str) else f.get("path") for f in content["files"] or []]
        if "path" in content:
            return [content["path"]]
        if isinstance(content.get("file"), dict):
            return [content["file"].get("path")]
        return []
    if isinstance(content, (list, tuple)):
        return [p for part in content for p in files_of(part)]
    return []


def image_conversation(message, history) -> tuple[list[dict], str | None]:
    """The text turns for the model and the newest image of the conversation (None: none yet). A turn
    that was only an image gives no text turn of its own; its question comes with the next message."""
    messages, image = [], None
    for m in [*history, {"role": "user", "content": message}]:
        if m.get("role") not in ("user", "assistant"):
            continue
        image = ([None] + files_of(m["content"]))[-1] or image
        text = text_of(m["content"])
        if messages and messages[-1]["role"] == m["role"]:       # an image turn, then its question
            messages[-1]["content"] = "\n".join(t for t in (messages[-1]["content"], text) if t)
        else:
            messages.append({"role": m["role"], "content": text})
    return messages, image


def chat_fn(backend: Backend):
    def chat(message, history, system_prompt, temperature, top_p, max_new_tokens):
        if backend.engine is None:
            yield backend.error
            return
        engine = backend.engine
        if backend.multimodal:
            messages, image = image_conversation(message, history)
            try:
                engine = engine.with_image(image)       # this request's own image; the model is shared
            except UserError:                          # the full reason names a server temp path: keep it in the log
                log.warning("unreadable image %s", image)
                yield f"⚠️ Cannot read the image {Path(image).name} -- attach a PNG, JPEG or WebP file."
                return
        else:
            messages = [{"role": m["role"], "content": text_of(m["content"])} for m in history
                        if m.get("role") in ("user", "assistant")]
            messages.append({"role": "user", "content": text_of(message)})
        yield from engine.stream_chat(messages, system_prompt=system_prompt, temperature=float(temperature),
                                      top_p=float(top_p), max_new_tokens=int(max_new_tokens))
    return chat


def build_demo(backend: Backend) -> gr.ChatInterface:
    if backend.multimodal:        # the message box takes an image; text models keep the plain box below
        extra = dict(multimodal=True, textbox=gr.MultimodalTextbox(
            file_types=["image"], file_count="single", sources=["upload"],
            placeholder="Attach an image (📎) and ask about it, e.g. what colour is the shape?"))
        examples = None           # no image ships with the app; a text-only example would not show the point
    else:
        extra, examples = {}, [[q, None, None, None, None] for q in EXAMPLES]
    demo = gr.ChatInterface(
        chat_fn(backend),
        additional_inputs=[
            gr.Textbox(backend.system_prompt, label="System prompt", lines=2,
                       info="Saved with the model at training time; empty = none."),
            gr.Slider(0.0, 1.5, value=TEMPERATURE, step=0.05, label="Temperature", info="0 = greedy"),
            gr.Slider(0.05, 1.0, value=TOP_P, step=0.05, label="Top-p"),
            gr.Slider(16, 2048, value=MAX_NEW_TOKENS, step=16, label="Max new tokens"),
        ],
        additional_inputs_accordion="Generation settings",
        # None for the extra inputs: the examples fill only the message and use the current settings.
        examples=examples, cache_examples=False,
        title="Your own assistant", description=backend.note, api_name="chat",
        concurrency_limit=CONCURRENCY, fill_height=True, **extra,
    )
    return demo.queue(max_size=QUEUE_SIZE, default_concurrency_limit=CONCURRENCY)


def create_app(env=None) -> gr.ChatInterface:
    return build_demo(start(env))


logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
logging.getLogger("own_assistant").setLevel(logging.INFO)     # ours: fetch progress, device; not every request
demo = create_app()


def main(argv=None) -> int:
    """No flags: the model comes from the environment, host/port from GRADIO_SERVER_NAME/_PORT."""
    demo.launch()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

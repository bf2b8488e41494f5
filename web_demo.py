"""Local Streamlit chat demo on the shared inference core; a side-by-side mode compares base and tuned.

    streamlit run web_demo.py -- --model merged/
    streamlit run web_demo.py -- --model base/ --adapter work/final          # base + LoRA adapter
    streamlit run web_demo.py -- --model merged/ --compare base/             # each question to both

Chat with history, generation settings in the sidebar, a button that clears the chat. With
`--compare BASE` every question goes to the tuned model and to BASE at once, and both answers stream
side by side (the course compares them by editing paths and restarting). Generation is the core's
`ChatEngine.stream_chat`: the same template and saved system prompt as training and the Gradio app.

A multimodal model (`--model` a merged LLaVA dir or an mm-train/mm-export dir, see
inference/image_chat.py `load_served`) gets an image attachment in the chat box: the chat is about
the newest image attached. Text models keep the plain chat box.

    streamlit run web_demo.py -- --model out/llava_merged
"""
from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

import streamlit as st

from inference import ChatEngine, Loaded, load
from inference.engine import SERVING_BATCH
from inference.errors import UserError


def parse_args(argv) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="streamlit run web_demo.py --", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="model dir (merged, or the base when --adapter is given)")
    p.add_argument("--adapter", help="PEFT adapter dir on top of --model, e.g. WORK_DIR/final")
    p.add_argument("--compare", metavar="BASE", help="also answer with this model, side by side")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    return p.parse_args(argv)


@st.cache_resource(show_spinner="Loading the model ...")
def engine_for(model: str, adapter: str | None, device: str) -> tuple[Loaded, ChatEngine]:
    # One engine per model for the whole server: its lock serialises generation across sessions.
    from inference.image_chat import load_served
    loaded = load_served(model, adapter, device) or load(model, adapter=adapter, device=device)
    engine = loaded.engine(max_batch=SERVING_BATCH)
    engine.warm_up()          # compile the decode step once per server, before the first reply
    return loaded, engine


IMAGE_TYPES = ["png", "jpg", "jpeg", "webp", "bmp", "gif"]


def is_multimodal(loaded) -> bool:
    from inference.image_chat import LoadedLlava
    return isinstance(loaded, LoadedLlava)


def image_from_upload(name: str, data: bytes):
    """An uploaded file's bytes -> the RGB PIL image the engine takes; a UserError when it is no image."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as img:
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        raise UserError(f"cannot read the image {name} -- attach a PNG, JPEG or WebP file") from None


def stream_together(streams, boxes) -> list[str]:
    """Advance every reply in turn so the answers grow side by side; the final texts."""
    texts, live = [""] * len(streams), list(range(len(streams)))
    while live:
        for i in list(live):
            try:
                texts[i] = next(streams[i])
                boxes[i].markdown(texts[i])
            except StopIteration:
                live.remove(i)
    return texts


def show(msg: dict) -> None:
    with st.chat_message(msg["role"]):
        if msg.get("image"):
            st.image(msg["image"], width=160)
        st.markdown(msg["content"])


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    st.set_page_config(page_title="Your own assistant", page_icon="💬", layout="wide" if args.compare else "centered")
    try:
        panes = [(f"Tuned · {Path(args.adapter or args.model).name}", *engine_for(args.model, args.adapter, args.device))]
        if args.compare:
            panes.append((f"Base · {Path(args.compare).name}", *engine_for(args.compare, None, args.device)))
    except UserError as exc:
        st.error(f"Model not loaded: {exc}")
        st.stop()

    with st.sidebar:
        st.header("Settings")
        system = st.text_area("System prompt", value=panes[0][1].system_prompt or "",
                              help="Saved with the tuned model at training time; empty = none. Sent to every model.")
        temperature = st.slider("Temperature", 0.0, 1.5, 0.3, 0.05, help="0 = greedy")
        top_p = st.slider("Top-p", 0.05, 1.0, 0.9, 0.05)
        max_new_tokens = st.slider("Max new tokens", 16, 2048, 256, 16)
        if st.button("Clear chat", width="stretch"):
            st.session_state.pop("history", None)
            st.session_state.pop("image", None)
        for label, loaded, _ in panes:
            st.caption(f"**{label}**: {loaded.note}")

    history = st.session_state.setdefault("history", {label: [] for label, *_ in panes})
    cols = st.columns(len(panes))
    for col, (label, *_) in zip(cols, panes):
        with col:
            if args.compare:
                st.subheader(label)
            for msg in history.setdefault(label, []):
                show(msg)

    multimodal = any(is_multimodal(loaded) for _, loaded, _ in panes)
    if multimodal:
        sent = st.chat_input("Attach an image and ask about it", accept_file=True, file_type=IMAGE_TYPES)
        prompt, files = (sent.text, sent.files) if sent else (None, [])
    else:
        sent = prompt = st.chat_input("Ask something, e.g. 你是谁？")
        files = []
    if sent:
        image = None
        if files:                     # a new image: the conversation is about it from now on
            try:
                image = image_from_upload(files[-1].name, files[-1].getvalue())
            except UserError as exc:
                st.error(str(exc))
                st.stop()
            st.session_state["image"] = (files[-1].name, files[-1].getvalue())
        elif "image" in st.session_state:
            image = image_from_upload(*st.session_state["image"])
        boxes, streams = [], []
        for col, (label, loaded, engine) in zip(cols, panes):
            turn = {"role": "user", "content": prompt or ""}
            if files and is_multimodal(loaded):
                turn["image"] = files[-1].getvalue()
            history[label].append(turn)
            with col:
                show(turn)
                with st.chat_message("assistant"):
                    boxes.append(st.empty())
            if is_multimodal(loaded):
                engine = engine.with_image(image)      # this request's image; the model is shared
            streams.append(engine.stream_chat([{"role": m["role"], "content": m["content"]} for m in history[label]],
                                              system_prompt=system, temperature=temperature,
                                              top_p=top_p, max_new_tokens=max_new_tokens))
        for (label, *_), text in zip(panes, stream_together(streams, boxes)):
            history[label].append({"role": "assistant", "content": text})
    return 0


if __name__ == "__main__":
    main()

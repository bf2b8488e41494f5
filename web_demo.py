"""Local Streamlit chat demo on the shared inference core; a side-by-side mode compares base and tuned.

    streamlit run web_demo.py -- --model merged/
    streamlit run web_demo.py -- --model base/ --adapter work/final          # base + LoRA adapter
    streamlit run web_demo.py -- --model merged/ --compare base/             # each question to both

Chat with history, generation settings in the sidebar, a button that clears the chat. With
`--compare BASE` every question goes to the tuned model and to BASE at once, and both answers stream
side by side (the course compares them by editing paths and restarting). Generation is the core's
`ChatEngine.stream_chat`: the same template and saved system prompt as training and the Gradio app.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import streamlit as st

from inference import ChatEngine, Loaded, load
from trainer.errors import UserError


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
    loaded = load(model, adapter=adapter, device=device)
    return loaded, loaded.engine()


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
        for label, loaded, _ in panes:
            st.caption(f"**{label}**: {loaded.note}")

    history = st.session_state.setdefault("history", {label: [] for label, *_ in panes})
    cols = st.columns(len(panes))
    for col, (label, *_) in zip(cols, panes):
        with col:
            if args.compare:
                st.subheader(label)
            for msg in history.setdefault(label, []):
                with st.chat_message(msg["role"]):
                    st.markdown(msg["content"])

    if prompt := st.chat_input("Ask something, e.g. 你是谁？"):
        boxes, streams = [], []
        for col, (label, _, engine) in zip(cols, panes):
            history[label].append({"role": "user", "content": prompt})
            with col:
                with st.chat_message("user"):
                    st.markdown(prompt)
                with st.chat_message("assistant"):
                    boxes.append(st.empty())
            streams.append(engine.stream_chat(history[label], system_prompt=system, temperature=temperature,
                                              top_p=top_p, max_new_tokens=max_new_tokens))
        for (label, *_), text in zip(panes, stream_together(streams, boxes)):
            history[label].append({"role": "assistant", "content": text})
    return 0


if __name__ == "__main__":
    main()

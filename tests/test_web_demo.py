"""web_demo.py: the Streamlit demo answers through the inference core, alone and side by side.

Proves (Streamlit's AppTest, the real script, tiny real models): the tuned model answers "你是谁"
with its name, the history grows over turns, the clear button empties it, the sidebar shows the
device; in compare mode (`--model BASE --adapter ADAPTER --compare BASE`) one question goes to both
models and each column holds its own answer -- the tuned one has the name, the base one does not;
a missing model dir is a clear error on the page. A multimodal model (the tiny LLaVA of
tests/conftest.py) takes an image attached in the chat box: each held-out image's colour question gets
the engine's own greedy answer (the right colour), the image is shown in the chat, a follow-up without
an attachment stays about it, a file that is no image is an error line; a text model's chat box takes
no files.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

SCRIPT = str(Path(__file__).resolve().parent.parent / "web_demo.py")
NAME = "Lumi"


def run_demo(monkeypatch, *args) -> AppTest:
    # AppTest runs the script in this process: its `streamlit run web_demo.py -- ARGS` arrive via sys.argv.
    monkeypatch.setattr(sys, "argv", ["web_demo.py", *map(str, args)])
    at = AppTest.from_file(SCRIPT, default_timeout=180)
    at.run()
    assert not at.exception, at.exception
    at.sidebar.slider[0].set_value(0.0)          # temperature 0: greedy, so the answer is reproducible
    return at


def answers(container) -> list[str]:
    return [m.markdown[0].value for m in container.chat_message if m.name == "assistant"]


def accepts_files(chat_input) -> bool:
    from streamlit.proto.ChatInput_pb2 import ChatInput as ChatInputProto

    return chat_input.proto.accept_file != ChatInputProto.AcceptFile.NONE


def test_chat_history_and_clear(merged_model, monkeypatch):
    at = run_demo(monkeypatch, "--model", merged_model)
    assert any("CPU (float32)" in c.value for c in at.sidebar.caption)
    assert not accepts_files(at.chat_input[0])                  # a text model: the plain chat box
    at.chat_input[0].set_value("你是谁").run()
    assert not at.exception, at.exception
    assert NAME in answers(at)[0]
    at.chat_input[0].set_value("What is 3 plus 4?").run()
    assert [m.name for m in at.chat_message] == ["user", "assistant"] * 2
    at.sidebar.button[0].click().run()
    assert len(at.chat_message) == 0


def test_compare_mode_sends_each_question_to_both(tiny_base, tuned_adapter, monkeypatch):
    at = run_demo(monkeypatch, "--model", tiny_base, "--adapter", tuned_adapter, "--compare", tiny_base)
    at.chat_input[0].set_value("你是谁").run()
    assert not at.exception, at.exception
    tuned, base = at.columns[0], at.columns[1]
    assert "Tuned" in tuned.subheader[0].value and "Base" in base.subheader[0].value
    assert [m.name for m in tuned.chat_message] == ["user", "assistant"] == [m.name for m in base.chat_message]
    assert NAME in answers(tuned)[0]
    assert NAME not in answers(base)[0] and answers(base)[0].strip()


def test_missing_model_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["web_demo.py", "--model", str(tmp_path / "nope")])
    at = AppTest.from_file(SCRIPT, default_timeout=60).run()
    assert "model directory not found" in at.error[0].value and not at.exception


def test_multimodal_model_takes_an_attached_image(mm_merged, mm_colour_images, monkeypatch):
    from inference.image_chat import load_llava
    own = load_llava(mm_merged, None, device="cpu").engine()      # the chat CLI's loader, apart from the demo
    q1, q2 = "what colour is the shape?", "what shape is it?"
    for colour, image in mm_colour_images.items():
        at = run_demo(monkeypatch, "--model", mm_merged)
        assert accepts_files(at.chat_input[0])
        at.chat_input[0].upload(image.name, image.read_bytes(), "image/png").set_value(q1).run()
        assert not at.exception, at.exception
        expected = own.with_image(image).chat([{"role": "user", "content": q1}], system_prompt="")
        assert answers(at) == [expected] and expected == f"It is {colour}."     # the answer depends on the image
        assert len(at.chat_message[0].get("image")) == 1                         # the upload is shown
        at.chat_input[0].set_value(q2).run()                                     # no attachment: same image
        history = [{"role": "user", "content": q1}, {"role": "assistant", "content": expected},
                   {"role": "user", "content": q2}]
        assert answers(at)[1] == own.with_image(image).chat(history, system_prompt="")
        assert answers(at)[1] != own.with_image(None).chat(history, system_prompt="")   # it needs the image
    at.chat_input[0].upload("broken.png", b"\x89PNG\r\n\x1a\n not really an image", "image/png").set_value(q1).run()
    assert "cannot read the image broken.png" in at.error[0].value and not at.exception
    assert len(answers(at)) == 2                                   # nothing was asked about it


def test_image_from_upload_gives_the_engine_an_rgb_image():
    import io

    from PIL import Image

    from inference.errors import UserError
    from web_demo import image_from_upload

    buf = io.BytesIO()
    Image.new("RGBA", (8, 8), (255, 0, 0, 128)).save(buf, format="PNG")
    img = image_from_upload("x.png", buf.getvalue())
    assert img.mode == "RGB" and img.size == (8, 8) and img.getpixel((0, 0)) == (255, 0, 0)
    with pytest.raises(UserError, match="cannot read the image y.png"):
        image_from_upload("y.png", b"GIF89a broken")

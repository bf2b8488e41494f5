"""app.py: the Gradio Space -- fetches its model, picks a device, streams, explains a model it can't load.

Proves: `python app.py` with MODEL_REPO = a local bare repo holding the tiny merged model in git-lfs
clones it (progress in the log), listens on GRADIO_SERVER_NAME/PORT, shows the device on the page
and answers "你是谁" with the trained name through gradio_client in several growing partials; a
second start reuses the clone with the remote gone; MODEL_PATH serves a local dir with the saved
system prompt as the default; no model at all serves the embedded real base (SmolLM2, untuned:
it answers a fact question right) with a note saying so, and
a space_config.json preset is read when the environment names no model; a
missing repo, a repo without weights, LFS pointers never pulled and a double setting each give one
clear line in the log and on the page (and as the chat answer), no traceback; 20 concurrent chats
against the launched app are all answered; a port taken between its pick and the server's start
costs nothing (retried, or the app reports the next port it bound); on a real GPU with too little
free memory the loader falls back to 4-bit, else to the CPU, and says why (skipped, with the reason,
where there is no CUDA GPU).
A multimodal model (the tiny LLaVA of tests/conftest.py, merged export) gets an image box: through
gradio_client with handle_file, each held-out image's colour question gets the engine's own greedy
answer, which is the right colour; a follow-up without a file stays about that image; a file that is
no image is a one-line answer; a text model keeps the plain text box.
"""
from __future__ import annotations

import gc
import json
import logging
import os
import re
import socket
import sys
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from inference.device import Placement
from inference.loader import param_count
from ports import serving, start_app, stop
from test_fetch import make_model_repo

ROOT = Path(__file__).resolve().parent.parent
NAME = "Lumi"


def import_app(model_path: Path):
    """Import app.py fresh, as a Space would, with MODEL_PATH set: its module-level `demo` serves it."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MODEL_PATH", str(model_path))
        mp.delenv("MODEL_REPO", raising=False)
        sys.modules.pop("app", None)
        import app
    return app


def page_config(url: str) -> str:
    with urllib.request.urlopen(url + "config", timeout=30) as r:
        return r.read().decode("utf-8")


def growing(partials: list[str]) -> bool:
    return all(b.startswith(a) for a, b in zip(partials, partials[1:]))


@pytest.fixture(scope="module")
def app(merged_model, tiny_base):
    return import_app(merged_model)


def test_model_repo_is_cloned_served_and_reused(app, merged_model, tmp_path, caplog):
    from gradio_client import Client

    remote = make_model_repo(merged_model, tmp_path / "lumi.git")
    log_path, cache = tmp_path / "app.log", tmp_path / "cache"
    env = {**os.environ, "MODEL_REPO": str(remote), "OWN_ASSISTANT_CACHE": str(cache)}
    env.pop("MODEL_PATH", None)
    proc, url = start_app([sys.executable, "app.py"], ROOT, env, log_path)   # listening: its log says so
    try:
        client = Client(url, verbose=False)
        partials = [str(p) for p in client.submit(message="你是谁", system_prompt="", temperature=0, top_p=0.9,
                                                  max_new_tokens=64, api_name="/chat")]
        assert len(partials) >= 3 and growing(partials), partials
        assert NAME in partials[-1]
        assert "CPU (float32)" in page_config(url)                    # the device is on the page
    finally:
        stop(proc)
    text = log_path.read_text()
    assert "git clone into" in text and "Cloning into" in text and "git lfs pull" in text, text
    assert "fetched commit" in text and re.search(r"serving \S*lumi-\w+ on CPU \(float32\)", text), text

    # Second start: the remote is gone, yet the model is there -- nothing is cloned again.
    remote.rename(tmp_path / "moved.git")
    caplog.set_level(logging.INFO)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OWN_ASSISTANT_CACHE", str(cache))
        backend = app.start({"MODEL_REPO": str(remote)})
    assert backend.engine is not None, backend.error
    assert "using the clone" in caplog.text and "git clone into" not in caplog.text


def test_model_path_and_the_default_demo_base(app, merged_model, tmp_path):
    import gradio as gr

    assert isinstance(app.demo, gr.ChatInterface)                 # module level, not launched on import
    assert not app.demo.multimodal and type(app.demo.textbox) is gr.Textbox    # a text model: no image input
    assert str(merged_model) in app.demo.description and "CPU (float32)" in app.demo.description
    saved = tmp_path / "with-prompt"
    saved.mkdir()
    for f in merged_model.iterdir():
        (saved / f.name).symlink_to(f)
    (saved / "assistant.json").unlink()
    (saved / "assistant.json").write_text(json.dumps({"system_prompt": "You are Lumi."}))
    assert app.start({"MODEL_PATH": str(saved)}).system_prompt == "You are Lumi."
    default = app.start({})                                       # nothing set: the embedded real base
    assert default.engine is not None and "untuned embedded base" in default.note
    answer = default.engine.chat([{"role": "user", "content": "What is the capital of France?"}], max_new_tokens=24)
    assert "paris" in answer.lower(), answer

    # A published Space carries its MODEL_REPO in space_config.json; the environment still wins.
    preset = tmp_path / "space_config.json"
    preset.write_text(json.dumps({"MODEL_REPO": str(tmp_path / "preset.git")}))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(app, "SPACE_CONFIG", preset)
        assert "preset.git: no such directory" in app.start({}).error
        assert app.start({"MODEL_PATH": str(merged_model)}).engine is not None


def lfs_stub(model_dir: Path, out: Path) -> Path:
    """A model dir as a clone without git-lfs leaves it: weights are 130-byte pointer files."""
    out.mkdir()
    for f in model_dir.iterdir():
        if f.suffix == ".safetensors":
            (out / f.name).write_text(f"version https://git-lfs.github.com/spec/v1\noid sha256:{'0' * 64}\n"
                                      f"size {f.stat().st_size}\n")
        else:
            (out / f.name).write_bytes(f.read_bytes())
    return out


def test_bad_sources_explain_themselves(app, merged_model, tmp_path, caplog):
    from gradio_client import Client

    caplog.set_level(logging.INFO)
    cases = {
        "missing path": ({"MODEL_REPO": str(tmp_path / "nope.git")}, "no such directory"),
        "not a source": ({"MODEL_REPO": "no repo here"}, "not a git URL"),
        "missing remote": ({"MODEL_REPO": f"file://{tmp_path}/nope.git"}, "git clone failed"),
        "no weights": ({"MODEL_REPO": str(make_model_repo(merged_model, tmp_path / "empty.git",
                                                          skip={"model.safetensors"}))}, "no weights"),
        "lfs pointers": ({"MODEL_PATH": str(lfs_stub(merged_model, tmp_path / "stub"))},
                         "is a git-lfs pointer, not the real file -- run `git lfs pull`"),
        "both": ({"MODEL_PATH": str(merged_model), "MODEL_REPO": "alice/lumi"}, "set only one"),
    }
    backends = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OWN_ASSISTANT_CACHE", str(tmp_path / "cache"))
        for case, (env, message) in cases.items():
            backends[case] = backend = app.start(env)
            assert backend.engine is None and message in backend.error and message in backend.note, case
            assert f"model not loaded: " in caplog.text and message in caplog.text, case
    assert "Traceback" not in caplog.text

    with serving(app.build_demo(backends["lfs pointers"])) as url:
        assert "git-lfs pointer" in page_config(url)                  # on the page ...
        reply = Client(url, verbose=False).predict(message="你是谁", api_name="/chat")
        assert "git-lfs pointer" in str(reply)                         # ... and as the answer


def test_every_start_error_is_one_line_on_the_page(tiny_base, monkeypatch, caplog):
    """Issue 16: `loaded.engine(...)` sat outside the error handling, so an engine that failed to start
    (the batcher or the CUDA decoder allocating) took the app down with a traceback. Now loading and
    starting the engine fail alike: one line on the page and as every chat answer, the trace in the log."""
    import inference.image_chat
    from inference.errors import UserError

    app = import_app(tiny_base)                  # a text model: load_served says None, `load` loads it

    class Loaded:
        note, system_prompt = "tiny on CPU (float32)", ""

        def __init__(self, error):
            self.error = error

        def engine(self, **kwargs):
            raise self.error

    monkeypatch.setattr(inference.image_chat, "load_served", lambda model_dir: None)
    caplog.set_level(logging.INFO)
    cases = [(RuntimeError("CUDA error: out of memory\nCUDA kernel errors might be asynchronously reported"),
              "RuntimeError: CUDA error: out of memory"),
             (UserError("\nthe model is too big for this machine\n  try a 4-bit load"),
              "the model is too big for this machine")]
    for error, line in cases:
        monkeypatch.setattr(app, "load", lambda model_dir, error=error: Loaded(error))
        backend = app.start({"MODEL_PATH": str(tiny_base)})
        assert backend.engine is None and backend.error == f"⚠️ The model could not be loaded: {line}"
        assert backend.note == f"⚠️ **Model not loaded:** {line}"
        assert list(app.chat_fn(backend)("hi", [], "", 0.0, 0.9, 16)) == [backend.error]
        app.build_demo(backend)                  # the page builds around it
    assert "Traceback" in caplog.text            # the unexpected one keeps its trace, in the log only


def test_twenty_concurrent_chats(app):
    from gradio_client import Client

    questions = ["你是谁", "Who are you?", "What is 3 plus 4?", "你好"] * 5

    def chat(question: str) -> str:
        job = Client(url, verbose=False).submit(message=question, system_prompt="", temperature=0, top_p=0.9,
                                                max_new_tokens=24, api_name="/chat")
        return str(job.result(timeout=300))

    with serving(app.demo) as url:
        with ThreadPoolExecutor(len(questions)) as pool:
            answers = list(pool.map(chat, questions, timeout=400))
    assert len(answers) == 20 and all(a.strip() for a in answers)
    assert all(NAME in a for q, a in zip(questions, answers) if q in ("你是谁", "Who are you?")), answers


def test_a_port_taken_after_the_pick_is_retried(app, merged_model, tmp_path, monkeypatch):
    """The gap between picking a free port and the server binding it (tests/ports.py): here another
    listener takes the picked port in that gap. The in-process demo retries, `python app.py` moves on to
    the next free port and reports it; each ends up on a port it holds, and the test talks to it, not
    to the squatter."""
    import ports

    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken, pick = squatter.getsockname()[1], ports.pick_port
        picks = iter([taken, pick(), taken])
        monkeypatch.setattr(ports, "pick_port", lambda: next(picks))
        with serving(app.demo) as url:
            assert url != f"http://127.0.0.1:{taken}/" and "CPU (float32)" in page_config(url)
        env = {**os.environ, "MODEL_PATH": str(merged_model)}
        env.pop("MODEL_REPO", None)
        log_path = tmp_path / "app.log"
        proc, url = start_app([sys.executable, "app.py"], ROOT, env, log_path)
        try:
            assert url != f"http://127.0.0.1:{taken}/" and "CPU (float32)" in page_config(url)
        finally:
            stop(proc)


NO_GPU = ("needs a CUDA GPU: the fallback reads the GPU's free memory (torch.cuda.mem_get_info) and loads "
          "4-bit there; on a CPU-only machine load() places the model on the CPU, with nothing to fall back from")


def hold_gpu_memory(free: float) -> torch.Tensor:
    """A real allocation that leaves about `free` bytes of this GPU free, as another process would."""
    gc.collect()
    torch.cuda.empty_cache()
    return torch.empty(max(torch.cuda.mem_get_info()[0] - int(free), 0), dtype=torch.uint8, device="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_GPU)
def test_gpu_too_small_falls_back(tiny_base, tmp_path, monkeypatch):
    """The serving loader (inference.load, what app.start calls) on a real GPU whose free memory a real
    allocation cuts down, with a ~200M-parameter Llama: room for bf16 -> bf16 on the GPU; room for nf4
    only -> 4-bit (bitsandbytes Linear4bit on the GPU) and a one-line note saying why; the same without
    bitsandbytes, or with no room even for nf4 -> CPU fp32 and a note. Every loaded model answers."""
    import bitsandbytes as bnb
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from inference.device import HEADROOM
    from inference.loader import load

    big = tmp_path / "big"
    config = AutoConfig.from_pretrained(tiny_base)
    config.update(dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=12, num_attention_heads=16,
                       num_key_value_heads=16, head_dim=64))
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(big)
    AutoTokenizer.from_pretrained(tiny_base).save_pretrained(big)
    n = param_count(big)
    assert n > 150_000_000
    bf16_need, nf4_need = n * 2 * HEADROOM, n * 0.6 * HEADROOM
    hi = [{"role": "user", "content": "hi"}]

    def served(free: float | None) -> tuple[Placement, str, set, int, list]:
        """(placement, note, devices of the weights, Linear4bit count, greedy reply ids) of load(big)
        with about `free` bytes of the GPU free (None: all of it)."""
        hold = hold_gpu_memory(free) if free is not None else None
        loaded = load(big)                                    # device auto, bits None: the app's call
        del hold
        devices = {p.device.type for p in loaded.model.parameters()}
        four_bit = sum(isinstance(m, bnb.nn.Linear4bit) for m in loaded.model.modules())
        ids = loaded.engine(fast_decode=False).greedy_ids(hi, 4)
        return loaded.placement, loaded.note, devices, four_bit, ids

    placement, note, devices, four_bit, ids = served(None)    # the whole GPU: as is
    assert (placement.device, devices, four_bit) == ("cuda", {"cuda"}, 0) and "GPU too small" not in note, note
    assert ids

    placement, note, devices, four_bit, ids = served((nf4_need + bf16_need) / 2)
    assert (placement.device, devices, four_bit) == ("cuda", {"cuda"}, 7 * 12), note   # q k v o gate up down
    assert re.search(r", 4-bit on .*\(GPU too small \(\d+\.\d GiB needed in bfloat16, \d+\.\d GiB free\): "
                     r"loading 4-bit\)$", note), note
    assert ids

    cpu = Placement("cpu", torch.float32)
    with monkeypatch.context() as mp:                          # bitsandbytes not installed (find_spec: None)
        mp.setitem(sys.modules, "bitsandbytes", None)
        placement, note, devices, four_bit, ids = served((nf4_need + bf16_need) / 2)
    assert (placement, devices, four_bit) == (cpu, {"cpu"}, 0), note
    assert note.endswith(" GiB free) and bitsandbytes is not installed: running on CPU)") and ids, note

    placement, note, devices, four_bit, ids = served(nf4_need / 2)   # not even room for nf4
    assert (placement, devices, four_bit) == (cpu, {"cpu"}, 0), note
    assert note.endswith(" GiB free): running on CPU)") and ids, note


def test_multimodal_model_takes_an_image_through_the_api(mm_merged, mm_colour_images, tmp_path):
    import gradio as gr
    from gradio_client import Client, handle_file

    from inference.image_chat import load_llava
    mm_app = import_app(mm_merged)                                # MODEL_PATH = the merged LLaVA export
    assert mm_app.demo.multimodal and isinstance(mm_app.demo.textbox, gr.MultimodalTextbox)
    assert "attach one" in mm_app.demo.description
    own = load_llava(mm_merged, None, device="cpu").engine()      # the chat CLI's loader, apart from the app
    q1, q2 = "what colour is the shape?", "what shape is it?"
    settings = dict(system_prompt="", temperature=0, top_p=0.9, max_new_tokens=16, api_name="/chat")
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really an image")
    with serving(mm_app.demo) as url:
        for colour, image in mm_colour_images.items():
            client = Client(url, verbose=False)                   # one client = one conversation
            partials = [str(p) for p in client.submit(message={"text": q1, "files": [handle_file(str(image))]},
                                                      **settings)]
            expected = own.with_image(image).chat([{"role": "user", "content": q1}], max_new_tokens=16,
                                                  system_prompt="")
            assert growing(partials) and partials[-1] == expected, (colour, partials, expected)
            assert expected == f"It is {colour}."                 # the answer depends on the image
            follow = str(client.predict(message={"text": q2, "files": []}, **settings))
            history = [{"role": "user", "content": q1}, {"role": "assistant", "content": expected},
                       {"role": "user", "content": q2}]
            assert follow == own.with_image(image).chat(history, max_new_tokens=16, system_prompt="")
            # still about the image: without it the same conversation gets another answer
            assert follow != own.with_image(None).chat(history, max_new_tokens=16, system_prompt="")
        text_only = str(Client(url, verbose=False).predict(message={"text": q1}, **settings))
        assert text_only == own.with_image(None).chat([{"role": "user", "content": q1}], max_new_tokens=16,
                                                      system_prompt="")
        bad = str(Client(url, verbose=False).predict(message={"text": q1, "files": [handle_file(str(broken))]},
                                                     **settings))
        assert bad == "⚠️ Cannot read the image broken.png -- attach a PNG, JPEG or WebP file."

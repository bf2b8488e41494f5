"""inference/api.py through the official `openai` client against a real uvicorn server on loopback, on the
tiny merged model: non-streamed and streamed greedy replies equal the core's own; usage is counted; a wrong
key gets 401; bad requests get 400 with an OpenAI error body; 20 concurrent streaming clients all finish
with complete replies; a client that disconnects mid-stream frees the engine."""
from __future__ import annotations

import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

KEY = "sk-test-own-assistant"
Q = [{"role": "user", "content": "你是谁"}]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(merged_model):
    import uvicorn

    from inference import load
    from inference.api import create_app
    from inference.engine import SERVING_BATCH

    engine = load(merged_model, device="cpu").engine(max_batch=SERVING_BATCH)      # as `python -m inference.api`
    assert engine.batcher is not None
    port = _port()
    server = uvicorn.Server(uvicorn.Config(create_app(engine, "lumi", KEY), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    yield engine, f"http://127.0.0.1:{port}/v1"
    server.should_exit = True
    thread.join(timeout=10)


def client(url, key=KEY):
    from openai import OpenAI

    return OpenAI(base_url=url, api_key=key, max_retries=0, timeout=120)


def test_replies_equal_the_cores_greedy_reply(served):
    engine, url = served
    want = engine.chat(Q, max_new_tokens=32)
    c = client(url)
    assert [m.id for m in c.models.list().data] == ["lumi"]
    r = c.chat.completions.create(model="lumi", messages=Q, max_tokens=32, temperature=0)
    assert r.choices[0].message.content == want and r.choices[0].message.role == "assistant"
    assert r.usage.prompt_tokens > 0 and r.usage.completion_tokens > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    stream = c.chat.completions.create(model="lumi", messages=Q, max_tokens=32, stream=True,
                                       stream_options={"include_usage": True})
    parts, usage, reasons = [], None, []
    for ch in stream:
        if ch.choices:
            parts.append(ch.choices[0].delta.content or "")
            reasons.append(ch.choices[0].finish_reason)
        if ch.usage:
            usage = ch.usage
    assert "".join(parts) == want and len(parts) > 2 and reasons[-1] in ("stop", "length")
    assert usage is not None and usage.completion_tokens == r.usage.completion_tokens


def test_a_stop_string_cuts_the_reply(served):
    engine, url = served
    want = engine.chat(Q, max_new_tokens=32)
    stop = want[2:4]
    r = client(url).chat.completions.create(model="lumi", messages=Q, max_tokens=32, stop=[stop])
    assert r.choices[0].message.content == want[:want.find(stop)] and r.choices[0].finish_reason == "stop"


def test_wrong_key_and_bad_requests_get_openai_errors(served):
    import openai

    _, url = served
    with pytest.raises(openai.AuthenticationError) as err:
        client(url, key="sk-wrong").chat.completions.create(model="lumi", messages=Q)
    assert err.value.status_code == 401 and err.value.body["code"] == "invalid_api_key"
    c = client(url)
    for kwargs, param in (({"messages": []}, "messages"),
                          ({"messages": [{"role": "robot", "content": "hi"}]}, "messages[0]"),
                          ({"messages": Q, "n": 2}, "n"),
                          ({"messages": Q, "temperature": 7}, "temperature")):
        with pytest.raises(openai.BadRequestError) as err:
            c.chat.completions.create(model="lumi", **kwargs)
        assert err.value.status_code == 400 and err.value.body["param"] == param, err.value.body


def test_twenty_concurrent_streams_all_finish(served):
    engine, url = served
    want = engine.chat(Q, max_new_tokens=16)

    def one(_):
        stream = client(url).chat.completions.create(model="lumi", messages=Q, max_tokens=16, stream=True)
        return "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices)

    with ThreadPoolExecutor(20) as pool:
        got = list(pool.map(one, range(20)))
    assert got == [want] * 20
    assert engine.batcher.peak >= 2, "the 20 streams were never decoded together"


def test_a_client_that_disconnects_frees_the_engine(served):
    import httpx

    engine, url = served
    body = {"model": "lumi", "messages": [{"role": "user", "content": "Tell me a long story."}],
            "max_tokens": 2000, "stream": True}
    engine.batcher.stop = set()                                           # it would never stop on its own
    try:
        with httpx.stream("POST", f"{url}/chat/completions", json=body,
                          headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as r:
            for i, _ in enumerate(r.iter_lines()):
                if i >= 6:
                    break                                   # leave mid-stream: the connection closes
    finally:
        deadline = time.monotonic() + 1.0
        while engine.batcher.running and time.monotonic() < deadline:
            time.sleep(0.01)
        engine.batcher.stop = set(engine.stop)
    assert engine.batcher.running == 0, "the abandoned reply is still being decoded"
    start = time.monotonic()
    r = client(url).chat.completions.create(model="lumi", messages=Q, max_tokens=4)
    assert time.monotonic() - start < 5 and r.choices[0].message.content

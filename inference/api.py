"""An OpenAI-compatible chat API on the core, for the tools that speak it (the `openai` client, LangChain,
Open WebUI ...): the same model, template and system prompt as the apps.

    python -m inference.api MODEL_DIR [--adapter DIR] [--host 127.0.0.1] [--port 8000]
    ASSISTANT_API_KEY=sk-... python -m inference.api MODEL_DIR          # Bearer key required

`GET /v1/models`; `POST /v1/chat/completions` with messages, stream, max_tokens (or max_completion_tokens),
temperature, top_p, stop, seed, stream_options.include_usage. Streaming is server-sent events in the chunk format
the official client parses, ending with `data: [DONE]`. Errors are OpenAI error objects: 400 for a bad request
(roles, empty messages, n > 1, out-of-range numbers), 401 for a wrong key, 503 when the wait queue is full --
never a traceback. A too-long conversation is trimmed from the oldest turns (as in the apps). Concurrent requests
are decoded together in the engine's running batch (inference/batching.py); a client that disconnects leaves the
batch within a token.
"""
# no `from __future__ import annotations`: FastAPI reads the endpoint annotations (Request) at runtime

import argparse
import json
import logging
import secrets
import threading
import time
import uuid

log = logging.getLogger("inference.api")
ROLES = ("system", "user", "assistant")
MAX_WAITING = 64           # requests in flight or waiting for the engine; beyond: 503


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def _text(content, where: str) -> str:
    """A message's content: a string, or a list of text parts (images are not served here)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
        return "".join(str(p.get("text", "")) for p in content)
    raise ApiError(400, f"{where}.content must be a string or a list of text parts", where)


def parse_request(body) -> dict:
    """The request's settings, checked; an ApiError (400) names the first bad field."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise ApiError(400, "messages must be a non-empty list", "messages")
    messages = []
    for i, m in enumerate(msgs):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise ApiError(400, f"{where}.role must be one of {', '.join(ROLES)}", where)
        messages.append({"role": m["role"], "content": _text(m.get("content"), where)})
    if messages[-1]["role"] != "user":
        raise ApiError(400, "the last message must be from the user", "messages")
    if body.get("n", 1) != 1:
        raise ApiError(400, "only n=1 is supported", "n")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens", 512))
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or not 1 <= max_tokens <= 8192:
        raise ApiError(400, "max_tokens must be an integer in [1, 8192]", "max_tokens")
    temperature = body.get("temperature", 0.0)
    if temperature is None:
        temperature = 0.0
    if not isinstance(temperature, (int, float)) or not 0 <= temperature <= 2:
        raise ApiError(400, "temperature must be a number in [0, 2]", "temperature")
    top_p = body.get("top_p", 1.0)
    top_p = 1.0 if top_p is None else top_p
    if not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise ApiError(400, "top_p must be a number in (0, 1]", "top_p")
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise ApiError(400, "stop must be a string or a list of up to 4 non-empty strings", "stop")
    seed = body.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise ApiError(400, "seed must be an integer", "seed")
    options = body.get("stream_options") or {}
    return {"messages": messages, "max_tokens": max_tokens, "temperature": float(temperature),
            "top_p": float(top_p), "stop": stop, "seed": seed, "stream": bool(body.get("stream")),
            "include_usage": bool(isinstance(options, dict) and options.get("include_usage"))}


def _cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    cut = min((text.find(s) for s in stops if s in text), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def create_app(engine, model_name: str, api_key: str | None = None, max_waiting: int = MAX_WAITING):
    """The FastAPI app serving ENGINE (an inference.ChatEngine) as MODEL_NAME."""
    from fastapi import FastAPI, Request
    from fastapi.concurrency import run_in_threadpool
    from fastapi.responses import JSONResponse, StreamingResponse

    app = FastAPI(title="own-assistant OpenAI-compatible API")
    slots = threading.BoundedSemaphore(max_waiting)
    created = int(time.time())

    @app.exception_handler(ApiError)
    async def api_error(request, exc: ApiError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(Exception)
    async def any_error(request, exc: Exception):          # never a traceback to the client
        log.exception("request failed")
        return JSONResponse(ApiError(500, f"internal error: {type(exc).__name__}", kind="server_error").body(),
                            status_code=500)

    def check_key(request: "Request") -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not secrets.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
            raise ApiError(401, "invalid API key: send Authorization: Bearer $ASSISTANT_API_KEY",
                           code="invalid_api_key")

    @app.get("/v1/models")
    async def models(request: Request):
        check_key(request)
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "own-assistant"}]}

    def count(messages, text, max_tokens) -> dict:
        prompt = int(engine.prepare(messages, None, max_tokens).shape[1])
        completion = len(engine.tokenizer.encode(text, add_special_tokens=False))
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def replies(req):
        """(text so far, stopped by a stop string) as the engine streams; closing it stops generation."""
        stream = engine.stream_chat(req["messages"], max_new_tokens=req["max_tokens"], seed=req["seed"],
                                    temperature=req["temperature"], top_p=req["top_p"])
        try:
            for text in stream:
                text, hit = _cut_at_stop(text, req["stop"])
                yield text, hit
                if hit:
                    return
        finally:
            stream.close()

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        check_key(request)
        try:
            body = await request.json()
        except (ValueError, UnicodeDecodeError):
            raise ApiError(400, "the request body is not valid JSON") from None
        req = parse_request(body)
        if not slots.acquire(blocking=False):
            raise ApiError(503, "the server is busy: too many requests waiting -- retry shortly",
                           kind="server_error", code="overloaded")
        rid, now = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())

        def finish(text, hit) -> tuple[str, dict]:
            usage = count(req["messages"], text, req["max_tokens"])
            done = "stop" if hit or usage["completion_tokens"] < req["max_tokens"] else "length"
            return done, usage

        if not req["stream"]:
            try:
                text, hit = "", False
                for text, hit in replies(req):
                    pass
                reason, usage = finish(text, hit)
            finally:
                slots.release()
            return {"id": rid, "object": "chat.completion", "created": now, "model": model_name,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                 "finish_reason": reason, "logprobs": None}], "usage": usage}

        def chunk(delta: dict, reason=None, usage=None, choices=True) -> str:
            data = {"id": rid, "object": "chat.completion.chunk", "created": now, "model": model_name,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": reason, "logprobs": None}]
                    if choices else []}
            if usage is not None:
                data["usage"] = usage
            return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

        def events():
            try:
                yield chunk({"role": "assistant", "content": ""})
                sent, hit = "", False
                for text, hit in replies(req):
                    if len(text) > len(sent):
                        yield chunk({"content": text[len(sent):]})
                        sent = text
                reason, usage = finish(sent, hit)
                yield chunk({}, reason)
                if req["include_usage"]:
                    yield chunk({}, usage=usage, choices=False)
                yield "data: [DONE]\n\n"
            finally:
                slots.release()

        async def body():
            # Starlette would run `events` in a thread pool and, when the client disconnects, only drop it -- its
            # `finally` (which takes the row out of the running batch) then waited for the garbage collector, and
            # an abandoned reply went on decoding, up to its max_tokens: 15 disconnects in a row on the tiny base
            # were released after 0.04-5.3 s (tests/test_api.py failed on it once in a full suite). Closed here, the
            # generation ends as soon as the disconnect cancels this task: 0.010-0.015 s in 15 of 15 (2026-12-07).
            it = events()
            try:
                while (chunk := await run_in_threadpool(next, it, None)) is not None:
                    yield chunk
            finally:
                it.close()

        return StreamingResponse(body(), media_type="text/event-stream")

    return app


def main(argv=None) -> int:
    import os

    import uvicorn

    from inference import load
    from inference.engine import SERVING_BATCH

    p = argparse.ArgumentParser(prog="python -m inference.api", description=__doc__.split("\n\n")[0])
    p.add_argument("model_dir")
    p.add_argument("--adapter", help="a LoRA adapter dir on top of MODEL_DIR")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--name", help="the model id clients send and see (default: the dir's name)")
    args = p.parse_args(argv)
    key = os.environ.get("ASSISTANT_API_KEY") or None
    if key is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("no ASSISTANT_API_KEY set and listening on %s: anyone who reaches it can use the model", args.host)
    loaded = load(args.model_dir, adapter=args.adapter)
    name = args.name or os.path.basename(os.path.normpath(args.adapter or args.model_dir))
    print(f"serving {loaded.note} as {name!r} on http://{args.host}:{args.port}/v1", flush=True)
    engine = loaded.engine(max_batch=SERVING_BATCH)
    engine.warm_up()          # compile the decode step before the first request, not during it
    app = create_app(engine, name, key)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    import sys

    from inference.errors import run_cli

    sys.exit(run_cli(main))

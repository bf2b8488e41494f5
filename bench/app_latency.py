"""First-token latency and decode speed of a model served by app.py, measured through its /chat API.

    python bench/app_latency.py --model MERGED_DIR [--runs 5] [--max-new-tokens 64] [--json out.json]

Imports app.py with MODEL_PATH=MODEL (its module-level demo), launches it on a loopback port and
asks each question in a new session through gradio_client, as a browser would: time to the first partial reply, then
tokens per second over the rest of the stream (tokens counted with the model's tokenizer). The same
questions go straight to the engine too, so the app's own overhead (queue, HTTP, SSE) is visible.
Prints a table and a JSON line. Greedy, CPU by default (`--device` is the loader's auto otherwise).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

QUESTIONS = ["你是谁", "Who are you?", "请做一下自我介绍", "What is 3 plus 4?", "你好"]


def timed(stream, tokenizer) -> dict:
    t0 = time.perf_counter()
    first = None
    text = ""
    for text in stream:
        text = str(text)
        if first is None and text:
            first = time.perf_counter()
    end = time.perf_counter()
    n = len(tokenizer(text, add_special_tokens=False).input_ids)
    decode = (n - 1) / (end - first) if first and end > first and n > 1 else float("nan")
    return {"first_token_s": (first or end) - t0, "total_s": end - t0, "tokens": n, "tokens_per_s": decode}


def summary(rows: list[dict]) -> dict:
    return {k: round(statistics.median(r[k] for r in rows), 4) for k in ("first_token_s", "total_s", "tokens",
                                                                        "tokens_per_s")}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="model dir to serve (e.g. the merged tiny model)")
    p.add_argument("--runs", type=int, default=5, help="questions asked per path (after one warm-up)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)

    os.environ["MODEL_PATH"] = str(Path(args.model).resolve())
    os.environ.pop("MODEL_REPO", None)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import torch
    from gradio_client import Client

    import app                                                  # builds app.demo for MODEL_PATH, as a Space does
    engine = app.start({"MODEL_PATH": os.environ["MODEL_PATH"]}).engine
    tok = engine.tokenizer
    gen = dict(temperature=0, top_p=0.9, max_new_tokens=args.max_new_tokens)
    qs = [QUESTIONS[i % len(QUESTIONS)] for i in range(args.runs)]

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app.demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        # A client session is one conversation (gradio keeps its history), so each question gets a fresh one.
        clients = [Client(f"http://127.0.0.1:{port}/", verbose=False) for _ in range(len(qs) + 1)]
        ask = lambda c, q: c.submit(message=q, system_prompt="", api_name="/chat", **gen)  # noqa: E731
        direct_stream = lambda q: engine.stream_chat([{"role": "user", "content": q}], system_prompt="", **gen)  # noqa: E731
        timed(ask(clients[-1], qs[0]), tok)                     # warm-up: the first request pays for setup
        timed(direct_stream(qs[0]), tok)
        via_app, direct = [], []
        for c, q in zip(clients, qs):                           # interleaved: load drift hits both paths alike
            via_app.append(timed(ask(c, q), tok))
            direct.append(timed(direct_stream(q), tok))
    finally:
        app.demo.close()

    result = {"model": os.environ["MODEL_PATH"], "device": engine.model.device.type,
              "dtype": str(engine.model.dtype).replace("torch.", ""), "threads": torch.get_num_threads(),
              "runs": args.runs, "max_new_tokens": args.max_new_tokens,
              "app": summary(via_app), "engine": summary(direct)}
    print(f"model {result['model']} on {result['device']} ({result['dtype']}, {result['threads']} threads), "
          f"greedy, median of {args.runs}")
    print(f"{'path':<8} {'first token (ms)':>17} {'tokens/s':>9} {'tokens':>7} {'total (ms)':>11}")
    for path in ("app", "engine"):
        r = result[path]
        print(f"{path:<8} {r['first_token_s'] * 1000:>17.1f} {r['tokens_per_s']:>9.1f} {r['tokens']:>7.0f} "
              f"{r['total_s'] * 1000:>11.1f}")
    print(json.dumps(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

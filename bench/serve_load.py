"""Serving load: N concurrent streaming clients through the OpenAI-compatible API on loopback.

    python bench/serve_load.py --model smollm2 --streams 1,4,16 --out serve-cpu.json     # 2 CPU cores
    python bench/serve_load.py --model /tmp/bench/model-internlm2-1.8b --streams 1,4,16 --engine batched fast \
        --out serve-gpu.json                                                                # one GPU
    python bench/serve_load.py --table serve-cpu.json serve-gpu.json                        # markdown
    python bench/serve_load.py --smoke                                                      # tiny base, CPU

Each engine is served by a real uvicorn server (inference/api.py) in a process of its own; the clients
are the official `openai` client in this process, one thread each, all sent at once. Engines: `batched` (what `python -m
inference.api` serves: continuous batching, inference/batching.py), `serial` (the engine without a
batcher: one request at a time through `generate`, the previous design) and, on CUDA, `fast` (serial
through the compiled static-cache decoder); and, as the reference without any server, `generate`: one
`model.generate` call over all N prompts at once (transformers' own static batching, left-padded, no
streaming, no HTTP). Every reply is exactly `--max-tokens` long (stop tokens
ignored, like vLLM's `--ignore-eos`), so runs compare the same work. Per level: aggregate tokens/s (all
tokens / wall time), per-stream tokens/s after the first token, time to first token p50 / p95; each
level is repeated (`--repeats`) and every repeat is kept in the JSON; the table shows the median and
the spread (min-max). The ratio column is the aggregate against the same engine's one stream, measured
in the same process.
"""
from __future__ import annotations

import argparse
import json
import platform
import socket
import statistics
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PROMPTS = ["Tell me a long story about a lighthouse keeper.", "Explain how a bicycle works, in detail.",
           "写一篇关于秋天的短文。", "Describe your ideal weekend, step by step.", "What should I know before adopting a cat?",
           "Write a letter to a friend who moved abroad.", "Explain photosynthesis to a ten-year-old.",
           "列出学习编程的十个建议，并逐条解释。"]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_forever(model_dir: str, kind: str, port: int, device: str, switch_interval: float | None = None) -> int:
    """The server process: ENGINE on MODEL_DIR behind uvicorn until killed. The clients run in another
    process, as they would on other machines: in one process their threads (SSE parsing) would take the
    GIL from the decode loop and the benchmark would measure that contention, not the server."""
    import uvicorn

    from inference import load
    from inference.api import create_app

    if switch_interval:
        sys.setswitchinterval(switch_interval)
    engine = build_engine(load(model_dir, device=device), kind)
    uvicorn.run(create_app(engine, "bench"), host="127.0.0.1", port=port, log_level="warning")
    return 0


def start_server(model_dir: Path, kind: str, device: str, switch_interval: float | None = None):
    import subprocess
    import urllib.request

    port = _port()
    proc = subprocess.Popen([sys.executable, __file__, "--serve", kind, "--model", str(model_dir), "--port", str(port),
                             "--device", device] + (["--switch-interval", str(switch_interval)] if switch_interval else []))
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.time() + 900
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the {kind} server exited with {proc.returncode}")
        try:
            urllib.request.urlopen(f"{url}/models", timeout=2)
            return proc, url
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise SystemExit(f"the {kind} server did not start")


def client(url: str):
    from openai import OpenAI

    return OpenAI(base_url=url, api_key="none", max_retries=0, timeout=3600)


def one_stream(api, prompt: str, max_tokens: int, t0: float) -> dict:
    first = None
    usage = None
    for chunk in api.chat.completions.create(model="bench", messages=[{"role": "user", "content": prompt}],
                                                max_tokens=max_tokens, stream=True,
                                                stream_options={"include_usage": True}):
        if chunk.choices and chunk.choices[0].delta.content and first is None:
            first = time.perf_counter()
        if chunk.usage:
            usage = chunk.usage
    end = time.perf_counter()
    # every reply runs to max_tokens (stop tokens ignored): that is the count; usage re-encodes the text,
    # which merges or drops tokens a random model's ids decode to, so it is kept only as a check
    tokens = max_tokens
    return {"ttft_s": first - t0, "end_s": end - t0, "tokens": tokens, "usage_tokens": usage.completion_tokens,
            "stream_tok_s": (tokens - 1) / (end - first) if end > first and tokens > 1 else None}


def level(url: str, n: int, max_tokens: int) -> dict:
    out = [None] * n
    # each user's client exists before the clock starts, as on users' own machines: building 16 of them
    # (an SSL context each) in this process took ~0.3 s of GIL time that landed in the time to first token
    clients = [client(url) for _ in range(n)]
    t0 = time.perf_counter()
    threads = [threading.Thread(target=lambda i=i: out.__setitem__(i, one_stream(clients[i], PROMPTS[i % len(PROMPTS)],
                                                                                  max_tokens, t0)))
               for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = max(s["end_s"] for s in out)
    ttft = sorted(s["ttft_s"] for s in out)
    return {"streams": n, "wall_s": wall, "tokens": sum(s["tokens"] for s in out),
            "aggregate_tok_s": sum(s["tokens"] for s in out) / wall,
            "per_stream_tok_s": statistics.median(s["stream_tok_s"] for s in out if s["stream_tok_s"]),
            "ttft_p50_s": statistics.median(ttft), "ttft_p95_s": ttft[min(n - 1, round(0.95 * (n - 1)))],
            "per_stream": out}


def reference(loaded, n: int, max_tokens: int) -> dict:
    """One `model.generate` over N prompts (left-padded), no streaming, no server: the plain library."""
    import torch

    from inference.chat_format import prompt_ids, with_system

    tok, model = loaded.tokenizer, loaded.model
    rows = [prompt_ids(tok, with_system([{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}], loaded.system_prompt))
            for i in range(n)]
    width = max(map(len, rows))
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=model.device)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=model.device)
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                             do_sample=False, pad_token_id=pad)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    tokens = (out.shape[1] - width) * n
    return {"streams": n, "wall_s": wall, "tokens": tokens, "aggregate_tok_s": tokens / wall,
            "per_stream_tok_s": tokens / n / wall, "ttft_p50_s": wall, "ttft_p95_s": wall}


def build_engine(loaded, kind: str):
    from inference.engine import SERVING_BATCH

    if kind in ("batched", "batched-dynamic"):
        # batched: what the app and API use (CUDA: fixed slots, one graph-replayed step; CPU: the dynamic
        # cache); batched-dynamic: the model's own forward over a stacked DynamicCache, on any device
        engine = loaded.engine(fast_decode=False, max_batch=max(SERVING_BATCH, 16),
                               batch_decoder="auto" if kind == "batched" else "dynamic")
        engine.batcher.stop = set()                     # every reply runs to max_tokens
    elif kind == "serial":
        engine = loaded.engine(fast_decode=False)
        engine.stop = [loaded.tokenizer.vocab_size - 1]     # an id it practically never picks: runs to max_tokens
    elif kind == "fast":
        engine = loaded.engine(fast_decode="compile")
        if engine.fast is None:
            raise SystemExit("--engine fast needs a CUDA GPU")
        engine.stop = [loaded.tokenizer.vocab_size - 1]     # an id it practically never picks: runs to max_tokens
    else:
        raise SystemExit(f"unknown engine {kind}")
    return engine


def random_model(shape: str, tokenizer_dir: Path, out: Path) -> Path:
    """A random-weight model of a named shape (bench/train_speed.py SHAPES) with a real tokenizer's vocabulary,
    so its ids decode to text the way a trained model's do (the streaming path decodes every token)."""
    import torch
    from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, str(REPO / "bench"))
    from train_speed import SHAPES

    if (out / "config.json").is_file():
        return out
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    end = tok.convert_tokens_to_ids("<|im_end|>")
    fields = {**SHAPES[shape], "vocab_size": len(tok)}
    config = LlamaConfig(**fields, rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=tok.bos_token_id,
                         eos_token_id=end, pad_token_id=tok.pad_token_id, dtype="bfloat16")
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(config)
    torch.set_default_dtype(torch.float32)
    model.generation_config = GenerationConfig(eos_token_id=[end], pad_token_id=tok.pad_token_id)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def run(model: str, engines: list[str], streams: list[int], max_tokens: int, repeats: int, device: str,
        switch_interval: float | None = None) -> dict:
    import torch

    from inference import load
    from trainer.bases.registry import resolve_model

    model_dir = resolve_model(model) if not Path(model).is_dir() else Path(model)
    loaded = load(str(model_dir), device=device) if "generate" in engines else None
    result = {"model": str(model_dir), "max_tokens": max_tokens, "repeats": repeats, "switch_interval": switch_interval,
              "threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
              "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
              "versions": versions(), "date": time.strftime("%Y-%m-%d"), "runs": []}
    for kind in engines:
        if kind == "generate":
            reference(loaded, 1, 8)                    # warm-up
            result["note"] = loaded.note
            for n in streams:
                reference(loaded, n, max_tokens)       # untimed warm-up of this batch size
                reps = [reference(loaded, n, max_tokens) for _ in range(repeats)]
                result["runs"].append(summarise(kind, n, reps))
            continue
        proc, url = start_server(model_dir, kind, device, switch_interval)
        try:
            one_stream(client(url), PROMPTS[0], max_tokens, time.perf_counter())   # warm-up: compile, allocator
            for n in streams:
                level(url, n, max_tokens)      # untimed: the first pass at a new batch size pays warm-up
                reps = [level(url, n, max_tokens) for _ in range(repeats)]
                result["runs"].append(summarise(kind, n, reps))
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    del loaded
    return result


def summarise(kind: str, n: int, reps: list[dict]) -> dict:
    row = {"engine": kind, "streams": n, "repeats": reps}
    for key in ("aggregate_tok_s", "per_stream_tok_s", "ttft_p50_s", "ttft_p95_s"):
        vals = [r[key] for r in reps]
        row[key] = statistics.median(vals)
        row[key + "_range"] = [min(vals), max(vals)]
    print(f"{kind:8} {n:3} streams: {row['aggregate_tok_s']:8.1f} tok/s aggregate, "
          f"{row['per_stream_tok_s']:7.1f} per stream, ttft p50 {row['ttft_p50_s']:.2f} s", flush=True)
    return row


def versions() -> dict:
    import importlib.metadata as md

    def version(name: str) -> str | None:     # None where it is not installed (the GPU machine has no fastapi)
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return None

    return {n: version(n) for n in ("torch", "transformers", "fastapi", "uvicorn", "openai")}


def table(results: list[dict]) -> str:
    lines = ["| model | device | engine | streams | aggregate tok/s (min-max) | x one stream | per-stream tok/s "
             "| TTFT p50 / p95 s |", "|---|---|---|---:|---:|---:|---:|---:|"]
    for res in results:
        device = res["gpu"] or f"CPU x{res['threads']} threads"
        ones = {r["engine"]: r["aggregate_tok_s"] for r in res["runs"] if r["streams"] == 1}
        for r in res["runs"]:
            lo, hi = r["aggregate_tok_s_range"]
            engine = r["engine"] + (f" (switch interval {res['switch_interval']} s)" if res.get("switch_interval") else "")
            base = ones.get(r["engine"])
            ratio = f"{r['aggregate_tok_s'] / base:.2f}" if base else "n/a"
            lines.append(f"| {Path(res['model']).name} | {device} | {engine} | {r['streams']} | "
                         f"{r['aggregate_tok_s']:.1f} ({lo:.1f}-{hi:.1f}) | {ratio} | {r['per_stream_tok_s']:.1f} | "
                         f"{r['ttft_p50_s']:.2f} / {r['ttft_p95_s']:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2", help="a model dir, or a base name (smollm2, tiny)")
    p.add_argument("--random-shape", help="instead: a random model of this shape (bench/train_speed.py SHAPES), "
                   "written to --model, with the vocabulary of --tokenizer")
    p.add_argument("--tokenizer", type=Path, help="tokenizer dir for --random-shape")
    p.add_argument("--engine", nargs="+", default=["batched", "serial"], choices=["batched", "batched-dynamic", "serial", "fast", "generate"])
    p.add_argument("--streams", default="1,4,16")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--device", default="auto")
    p.add_argument("--out")
    p.add_argument("--table", nargs="+", metavar="JSON")
    p.add_argument("--serve", choices=["batched", "batched-dynamic", "serial", "fast"], help=argparse.SUPPRESS)   # the server process
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--switch-interval", type=float, help="the server's sys.setswitchinterval (default Python's 0.005 s)")
    p.add_argument("--smoke", action="store_true", help="CPU, 1 and 2 streams, 8 tokens (default model: tiny)")
    a = p.parse_args(argv)
    if a.serve:
        return serve_forever(a.model, a.serve, a.port, a.device, a.switch_interval)
    if a.table:
        print(table([json.loads(Path(f).read_text()) for f in a.table]))
        return 0
    if a.smoke:
        a.streams, a.max_tokens, a.repeats, a.device = "1,2", 8, 1, "cpu"
        a.model = a.model if a.model != "smollm2" else "tiny"
    if a.random_shape:
        random_model(a.random_shape, a.tokenizer, Path(a.model))
    res = run(a.model, a.engine, [int(s) for s in a.streams.split(",")], a.max_tokens, a.repeats, a.device,
              a.switch_interval)
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=1))
    print(table([res]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

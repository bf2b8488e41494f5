"""Decoding in the core, no server: tokens/s of the batchers and of the streaming path against plain generate.

    python bench/batch_decode.py --model DIR --streams 1,4,16 --max-tokens 128 --repeats 3 --out decode.json
    python bench/batch_decode.py --smoke          # CPU, the tiny base, 8 tokens
    python bench/batch_decode.py --table decode.json
    OMP_NUM_THREADS=2 python bench/batch_decode.py --model smollm2 --device cpu --impl generate slots \
        compiled-slots --cpu-weights fp32,int8,int4 --streams 1,4 --max-tokens 128 --repeats 3    # CPU decode (issue 19)

Rows of the table (each level run once untimed, then `--repeats` times; median and min-max reported):
- generate:  transformers' `generate` on one prompt batch of N rows (static batch, greedy; the reference);
- stream:    `ChatEngine.stream_chat` on the generate path (worker thread + token queue + detokeniser),
             one reply at a time -- issue 19: within 1.2x of plain generate at 1 stream;
- thread / drain / worker: where the streaming path's time goes -- generate in a worker thread with the main thread
             only joining it (thread), and with the engine's token queue drained by the main thread
             without detokenising (drain); worker: generate in one long-lived worker thread, as the
             engine now runs it (cuDNN keeps attention plans per thread: see inference/engine.py);
- slots:     the slot batcher (inference/slot_decode.py; CUDA: compiled, graph-replayed), N consumer threads;
             pipelined: each step's tokens are picked on the device and fed to the next step before the host
             reads them (inference/slot_batcher.py);
- slots-lockstep: the same batcher with the host picking every token before the next step (the session-6 path);
- compiled-slots: the slot batcher with its step torch.compile'd on any device (CPU: inductor's C++);
- tuned-slots: `slots` with the step's kernels tuned (`batch_decoder="tuned-slots"`: inductor's coordinate descent);
- dynamic:   the dynamic-cache batcher (inference/batching.py), N consumer threads.
- serve:     what the apps and the API run: `ChatEngine(max_batch=SERVING_BATCH).stream_chat` (on CPU the dynamic
             batcher) with its detokeniser, N consumer threads; the engine makes its own int8 / int4 copy (prompts
             read by the fp32 model, as the apps do); on the CPU with int8 / int4 its decode step is compiled
             (inference/row_step.py), the engine warmed up first as the apps do;
- serve-dynamic: `serve` with the batcher running the model's own forward each step (the apps before session 16).
`--cpu-weights fp32,int8,int4` runs every row once per weight kind: int8 / int4 are the engine's
`cpu_decode="int8"` / `"int4"` (inference/cpu_decode.py: weight-only linear layers, CPU only).
Consumers only drain token ids, so the batcher rows show what the core can decode; bench/serve_load.py
adds the API server and the `openai` clients on top. Every reply runs to --max-tokens (stop ids off).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SLOT_IMPLS = ("slots", "slots-lockstep", "compiled-slots", "tuned-slots")
PROMPT = [{"role": "user", "content": "Tell me a long story about a lighthouse keeper."}]


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def generate_level(loaded, n: int, max_tokens: int):
    import torch

    from inference.chat_format import prompt_ids

    ids = torch.tensor([prompt_ids(loaded.tokenizer, PROMPT)] * n, device=loaded.model.device)

    def go():
        with torch.no_grad():
            loaded.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                                  min_new_tokens=max_tokens, do_sample=False, pad_token_id=0)
    return go


def stream_level(engine, n: int, max_tokens: int):
    def go():
        for _ in range(n):
            for _text in engine.stream_chat(PROMPT, max_new_tokens=max_tokens):
                pass
    return go


def thread_level(loaded, engine, n: int, max_tokens: int, drain: bool, pool=None):
    """generate in a new thread per reply (POOL None; the engine before session 6) or in POOL's one long-lived
    worker thread (the engine now); DRAIN: with the engine's token queue, read here."""
    import torch

    from inference.engine import _IdStreamer

    ids = engine.prepare(PROMPT, None, max_tokens)
    kwargs = engine._gen_kwargs(max_tokens, 0.0, 1.0, 1.0)

    def go():
        for _ in range(n):
            streamer = _IdStreamer() if drain else None

            def work():
                with torch.no_grad():
                    loaded.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), streamer=streamer,
                                          **kwargs)
                if streamer is not None:
                    streamer.end()
            if pool is not None:
                done = pool.submit(work)
            else:
                t = threading.Thread(target=work)
                t.start()
            if streamer is not None:
                for _ids in streamer.ids():
                    pass
            done.result() if pool is not None else t.join()
    return go


def serve_level(engine, n: int, max_tokens: int):
    def go():
        replies = [""] * n

        def one(i):
            for replies[i] in engine.stream_chat(PROMPT, max_new_tokens=max_tokens):
                pass
        threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert all(replies), replies
    return go


def batcher_level(batcher, prompt: list[int], n: int, max_tokens: int, temperature: float = 0.0):
    sampling = dict(temperature=temperature, top_p=0.9, seed=0) if temperature else {}

    def go():
        counts = [0] * n

        def one(i):
            counts[i] = sum(1 for _ in batcher.tokens(prompt, max_tokens, **sampling))
        threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert counts == [max_tokens] * n, counts
    return go


def run(model: str, impls: list[str], streams: list[int], max_tokens: int, repeats: int, device: str,
        weights: list[str] = ("fp32",), temperature: float = 0.0) -> dict:
    import dataclasses

    import torch
    import transformers

    from inference import load
    from inference.chat_format import prompt_ids
    from inference.cpu_decode import decode_model
    from inference.engine import SERVING_BATCH
    from trainer.bases.registry import resolve_model

    base = load(str(resolve_model(model)), device=device)
    dev = base.model.device
    never = [base.tokenizer.vocab_size - 1]          # an id it practically never picks: replies run to the cap
    prompt = prompt_ids(base.tokenizer, PROMPT)
    result = {"model": model, "device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
              "torch": torch.__version__, "transformers": transformers.__version__, "max_tokens": max_tokens,
              "temperature": temperature,
              "repeats": repeats, "date": time.strftime("%Y-%m-%d"), "rows": []}
    # the int8 / int4 copy is what `cpu_decode=...` gives the engine; its engines then decode it as is
    models = {}      # made on first use: `serve` rows build their engine's own copy, as the apps do
    for w, impl in [(w, impl) for w in weights for impl in impls]:
        if not impl.startswith("serve") and w not in models:
            models[w] = decode_model(base.model, w)
        loaded = dataclasses.replace(base, model=models.get(w, base.model))
        if impl in (*SLOT_IMPLS, "dynamic"):
            kind = "slots" if impl == "slots-lockstep" else impl
            engine = loaded.engine(fast_decode=False, cpu_decode="fp32", max_batch=max(streams), batch_decoder=kind)
            engine.batcher.stop = set()
            if impl == "slots-lockstep":
                engine.batcher.pipeline = False
        elif impl in ("stream", "thread", "drain", "worker"):
            engine = loaded.engine(fast_decode=False, cpu_decode="fp32")
            engine.stop = never
        elif impl.startswith("serve"):  # the apps' engine (app.py, web_demo.py, inference/api.py), its own int8/4 copy
            engine = base.engine(fast_decode=False, cpu_decode=w, max_batch=max(SERVING_BATCH, *streams),
                                 batch_decoder="dynamic" if impl == "serve-dynamic" else "auto")
            started = time.perf_counter()
            engine.warm_up()
            engine_warm_s = round(time.perf_counter() - started, 2)
            if engine.batcher is not None:
                engine.batcher.stop = set()
            engine.stop = never
        for n in streams:
            if impl == "generate":
                go = generate_level(loaded, n, max_tokens)
            elif impl == "stream":
                go = stream_level(engine, n, max_tokens)
            elif impl.startswith("serve"):
                go = serve_level(engine, n, max_tokens)
            elif impl in ("thread", "drain", "worker"):
                go = thread_level(loaded, engine, n, max_tokens, drain=impl == "drain",
                                  pool=ThreadPoolExecutor(max_workers=1) if impl == "worker" else None)
            else:
                go = batcher_level(engine.batcher, prompt, n, max_tokens, temperature)
            warm = timed(go, dev)                       # compile, graph capture, allocator
            times = [timed(go, dev) for _ in range(repeats)]
            rates = sorted(n * max_tokens / t for t in times)
            row = {"impl": impl, "weights": w, "streams": n, "warmup_s": round(warm, 3), "seconds": [round(t, 4) for t in times],
                   "tok_s_median": round(statistics.median(rates), 1), "tok_s_min": round(rates[0], 1),
                   "tok_s_max": round(rates[-1], 1),
                   "ms_per_step": round(statistics.median(times) / max_tokens * 1000 /
                                         (n if impl in ("stream", "thread", "drain", "worker") else 1), 2)}
            row_step = getattr(engine.batcher, "row_step", None) if impl.startswith("serve") else None
            if row_step is not None:   # compiled, or why not
                row.update(row_steps=row_step.steps, row_step_error=row_step.failed, engine_warm_up_s=engine_warm_s)
            if impl in SLOT_IMPLS:     # compiled and graph-replayed, or why not
                dec = engine.batcher.decoder
                row.update(graphs=sorted(dec.graphs), graph_error=dec.graph_error, compile_fallback=dec.fallback,
                           pipelined_steps=engine.batcher.pipelined_steps, lockstep_steps=engine.batcher.lockstep_steps)
            result["rows"].append(row)
            print(json.dumps(row), flush=True)
    return result


def table(res: dict) -> str:
    one = {(r["impl"], r["weights"]): r["tok_s_median"] for r in res["rows"] if r["streams"] == 1}
    lines = [f"{res['device']}, torch {res['torch']}, transformers {res['transformers']}, {res['date']}, "
             f"{res['max_tokens']} tokens per reply, "
             f"{'temperature ' + str(res['temperature']) if res.get('temperature') else 'greedy'}, "
             f"median of {res['repeats']} (min-max)",
             "| impl | weights | streams | tokens/s | min-max | ms/step | x one stream |",
             "|---|---|---:|---:|---|---:|---:|"]
    for r in res["rows"]:
        key = (r["impl"], r["weights"])
        ratio = r["tok_s_median"] / one[key] if one.get(key) else float("nan")
        lines.append(f"| {r['impl']} | {r['weights']} | {r['streams']} | {r['tok_s_median']:.1f} | {r['tok_s_min']:.1f}-"
                     f"{r['tok_s_max']:.1f} | {r['ms_per_step']:.2f} | {ratio:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2", help="a model dir or a base name (smollm2, tiny)")
    p.add_argument("--impl", nargs="+", default=["generate", "stream", "slots", "dynamic", "serve"],
                   choices=["generate", "stream", "thread", "drain", "worker", "slots", "slots-lockstep", "compiled-slots",
                            "tuned-slots", "dynamic", "serve", "serve-dynamic"])
    p.add_argument("--temperature", type=float, default=0.0,
                   help="the batchers' rows sample (top-p 0.9, seeded) instead of greedy")
    p.add_argument("--cpu-weights", default="fp32", help="fp32, int8, int4, comma-separated (int8 / int4: CPU only)")
    p.add_argument("--streams", default="1,4,16")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="auto")
    p.add_argument("--keep-threads", action="store_true",
                   help="decode workers keep torch's default thread count (the engine before session 13), to compare")
    p.add_argument("--out")
    p.add_argument("--smoke", action="store_true", help="CPU, 1 and 2 streams, 8 tokens (default model: tiny)")
    p.add_argument("--table", nargs="+", metavar="JSON", help="print the tables of earlier --out files and stop")
    a = p.parse_args(argv)
    if a.table:
        print("\n".join(table(json.loads(Path(f).read_text())) for f in a.table))
        return 0
    if a.smoke:
        a.streams, a.max_tokens, a.repeats, a.device = "1,2", 8, 1, "cpu"
        a.model = a.model if a.model != "smollm2" else "tiny"
    from inference.cpu_decode import check

    if a.keep_threads:         # the engine's worker and the batcher's loop, as before inference/device.py's rule
        import torch

        import inference.batching
        import inference.engine
        inference.engine.use_decode_threads = inference.batching.use_decode_threads = \
            lambda device: torch.get_num_threads()
    weights = [check(w.strip()) for w in a.cpu_weights.split(",")]
    res = run(a.model, a.impl, [int(s) for s in a.streams.split(",")], a.max_tokens, a.repeats, a.device, weights,
              a.temperature)
    print(table(res))
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

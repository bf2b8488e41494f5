#!/usr/bin/env bash
# The GPU benchmark suite: the one command run on the lent GPU machine (docs/BENCHMARKS.md). Set-up and the
# step helpers live here; the stages, grouped by what they measure, in bench/gpu_stages/{train,serve,multi}.sh.
#
#   bash bench/gpu_suite.sh speed6|speed|final2|explore|final|multi      # on the GPU machine, from the repo root
#
# Needs, carried beside the repo in .whl/ (no registry there): the wheels of transformers 5.24.0,
# peft 0.21.2 and bitsandbytes 0.50.2 (its CUDA 13 build), and .whl/tiny-base (the tiny base, for its
# tokenizer and the tiny multi-GPU checkpoints). Logs, result JSONs and small checkpoints are tarred
# into $OUT after every step, so a run stopped at its time limit still brings back what it measured.
#   explore: where the time goes -- baseline and our speed features one by one (2 GPUs, one queue each),
#            decode (generate vs fast_decode), the tiny model on 2 GPUs (DDP LoRA, FSDP full)
#   final:   baseline best vs ours best, a few hundred steps each (loss curves), and the course's job end
#            to end (train + merge)
#   speed:   (session 2) flex attention, bf16 residual, micro-batch 16 vs the baseline at 32k tokens a step,
#            with a profile of each; the course's LLaVA shape (bench/llava_gpu.py); decode ($DECODE)
#   final2:  (session 2) ours' best to the end with a profile, decode graph vs compile (cold, warm cache),
#            the course's job end to end without and with compile
#   multi:   ours on 1 and on 2 GPUs (same global batch, loss curves), FSDP full fine-tuning of a 14B shape
#   scale3:  (session 3) the 1.8B preset's micro-batch 16 on 1 vs 2 GPUs (bench/multi_gpu.py scaling), at
#            2,048-token rows and at the preset's own 1,024
#   serve5:  (session 5) bench/serve_load.py on the 1.8B shape: plain generate, the batcher, the compiled
#            decoder and the serial generate path at 1/4/16 streams; the compiled decoder's cold first call
#   serve6:  (session 6) the slot batcher (fixed cache slots, one compiled graph-replayed step) against the
#            dynamic-cache batcher and plain generate, in the core (bench/batch_decode.py) and through the API
#            (bench/serve_load.py) at 1/4/16 streams; the generate path's streaming cost at 1 stream
#   serve6b: (session 6) serve6 again after tokens were handed over at most every 10 ms (FLUSH_S), shorter:
#            the slot batcher in the core and through the API; where the streaming path's time goes
#   serve7:  (session 7) the pipelined slot batcher (tokens picked on the device, the next step launched before
#            the host reads them) against lockstep, greedy and sampled, core and API; the streaming path in one
#            worker thread against generate; compiled batch-1 decode, cold and warm inductor cache
#   serve7b: (session 7) serve7's core and API rows again after a burst of requests all join before the next step
#            and the benchmark's clients are built before its clock starts
#   serve7c: (session 7) serve7b again after sampled rows draw in a few batched ops (inference/row_sampling.py)
#   train9:  (session 9) train8 plus bf16 LoRA with half the layers recomputed, and with LoRA dropout 0
#   course9b: (session 9) one9's course rows after the adapters' input casts went under autocast
#   one9:    (session 9) the one call: plain QLoRA, bits auto, the course's job shipped vs bits auto merged in-process
#   train11: (session 11) the 24 GiB budget spent on fewer recomputed layers instead of a big micro-batch: bits auto
#            and bits 4 at 2 x 8 with no recomputation, bits auto at 4 x 4 with a quarter recomputed, against plain
#            QLoRA and bits auto as shipped (16 x 1, all recomputed), once each
#   train10: (session 10) the course's job as shipped vs bits auto merged in-process, plain QLoRA vs bits auto, after
#            the adapters' input casts went under autocast (session 9's fix), once each
#   train15: (session 15) plain QLoRA against bits auto as shipped, each run twice in the call
#   decode15: (session 15) decode10's compiled decode and streaming rows again, beside the same compiled decode with
#            inductor's coordinate-descent tuning (gpt-fast's setting), cold and warm, each in its own cache dir
#   decode15b: (session 15) the shipped "tuned" mode against "compile", batch-1 and the slot batcher's step
#   decode16: (session 16) the compiled batch-1 decode and the slot batcher before and after the shared attend()
#   decode10: (session 10) compiled batch-1 decode cold and warm, the streaming paths against generate, the slot
#            batcher, on whatever card comes (the issue's 600 tokens/s is about an H200)
#   course9: (session 9) the course's job as shipped against bits auto merged in the training process
#   train8:  (session 8) `bits: auto` (bf16 LoRA) with our speed fields beside ours at bits 4 and plain QLoRA, once each
#   check8:  (session 8) the compiled decode paths on CUDA after the q/k/v projection was shared: --smoke's greedy ids
#            of graph and compile against generate, the slot batcher against generate, compiled decode cold
#   big3:    (session 3) full fine-tuning of the 7B shape with fp32 master weights: one GPU (out of memory?)
#            and FSDP2 on two, with each process's memory on each GPU
#   train18: (session 18) the course preset's QLoRA (ours at bits 4): fused-loss chunks eager vs compiled, LoRA dropout 0
#   train19: (session 18) whole decoder layers compiled against blocks on CUDA (QLoRA, bits auto); bits auto's profile
#   speed6:  (session 6, issue 19; ONE GPU, H100 or H200) the strongest standard stacks vs ours, each run twice
#            (--repeats 2) at 16 rows of 2,048 tokens per optimizer step: plain QLoRA (8 x 2, checkpointing,
#            causal sdpa), ours with the course preset's speed settings (16 x 1), bf16 LoRA + per-layer
#            compile (4 x 4, checkpointing); the report gives each run's median s/step, its min-max and the
#            spread across repeats. STEPS (default 16) / WARMUP (4) trade steps for time: fewer, never missing runs
set -u
STAGE=${1:-explore}
grep -qE "^([a-z0-9]+[|])*$STAGE([|][a-z0-9]+)*[)]" bench/gpu_stages/*.sh \
  || { echo "unknown stage '$STAGE': the stages are the case labels in bench/gpu_stages/*.sh"; exit 2; }
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1   # the host's rule
export TORCHINDUCTOR_CACHE_DIR=/tmp/inductor-cache
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || { echo "wheel install failed"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD
R=/tmp/bench
L=/tmp/suite-logs
mkdir -p "$R" "$L"
T0=$(date +%s)

snap() {   # results + logs (never weights) into one tarball in $OUT
  (cd / && find "${R#/}" "${L#/}" -maxdepth 4 \( -name '*.json' -o -name '*.jsonl' -o -name '*.log' -o -name '*.txt' \
     -o -name 'config.yaml' \) -not -path '*/final/*' -not -path '*/checkpoint-*' -not -path '*/model-*' 2>/dev/null \
     | tar czf "$OUT/results-$STAGE.tgz" -T - 2>/dev/null)
}
DEADLINE=${DEADLINE:-560}   # seconds: every step ends by then, so the call returns inside its 600 s limit
step() {   # step NAME TIMEOUT_S CMD... : logged, time-limited, never stops the suite
  local name=$1 limit=$2; shift 2
  local t=$(date +%s)
  local left=$(( DEADLINE - (t - T0) ))
  (( left < limit )) && limit=$left
  (( limit < 20 )) && { echo "=== $name: skipped, ${left} s left"; return 0; }
  echo "=== $name ($(( t - T0 )) s into the suite, limit $limit s)"
  timeout --kill-after=20 "$limit" "$@" > "$L/$name.log" 2>&1
  local rc=$?
  grep -h "^RESULT\|^PROFILE\|^within\|Error\|error:" "$L/$name.log" | tail -16
  echo "=== $name: exit $rc after $(( $(date +%s) - t )) s"
  snap
  return 0
}
TS="python3 bench/train_speed.py"

echo "== $(date -u +%FT%TZ) stage $STAGE"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader
python3 - <<'EOF' | tee "$L/ceilings.log"
import time, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "gpus", torch.cuda.device_count())
a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16); b = torch.randn_like(a)
for _ in range(3): a @ b
torch.cuda.synchronize(); t = time.perf_counter()
for _ in range(20): a @ b
torch.cuda.synchronize(); dt = (time.perf_counter() - t) / 20
print(f"CEILING bf16 matmul {2 * 8192**3 / dt / 1e12:.0f} TFLOP/s")
x = torch.empty(2**31, dtype=torch.uint8, device="cuda"); y = torch.empty_like(x)
y.copy_(x); torch.cuda.synchronize(); t = time.perf_counter()
for _ in range(10): y.copy_(x)
torch.cuda.synchronize(); print(f"CEILING copy {2 * 2**31 * 10 / (time.perf_counter() - t) / 1e12:.2f} TB/s")
EOF
export PEAK_TFLOPS=$(grep -o 'matmul [0-9]*' "$L/ceilings.log" | grep -o '[0-9]*' || echo 780)
python3 -c "import bitsandbytes, transformers, peft; print('bnb', bitsandbytes.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"
case "$STAGE" in   # stages that never read the packed identity data: decode, serving, big3 (its own shape)
  big3|serve5|serve6|serve6b|serve7|serve7b|serve7c|check8|decode10|decode15|decode15b|decode16|diag17) ;;
  *) step prepare 240 $TS prepare --shape internlm2-1.8b --out $R --n 10001 ;;
esac
ls -la $R

build_smol() {   # the 1.8B shape with random weights and SmolLM2's tokenizer (.whl/smol-tok) at $M
  step serve_build 150 python3 bench/serve_load.py --random-shape internlm2-1.8b --tokenizer .whl/smol-tok \
    --model $M --engine generate --streams 1 --max-tokens 8 --repeats 1 --out $R/serve_build.json
}
serve6_tables() {
  for f in core core_stream; do [ -f $R/$f.json ] && python3 bench/batch_decode.py --table $R/$f.json \
    | tee -a $L/serve6_table.txt; done
  [ -f $R/serve_api.json ] && python3 bench/serve_load.py --table $R/serve_api.json | tee -a $L/serve6_table.txt
}
for f in bench/gpu_stages/*.sh; do source "$f"; done     # each holds a `case "$STAGE"` of its own stages
snap
echo "== suite done in $(( $(date +%s) - T0 )) s"

#!/usr/bin/env bash
# The GPU benchmark suite: the one command run on the lent 2 x H200 machine (docs/BENCHMARKS.md).
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
#   speed6:  (session 6, issue 19; ONE GPU, H100 or H200) the strongest standard stacks vs ours, each run twice
#            (--repeats 2) at 16 rows of 2,048 tokens per optimizer step: plain QLoRA (8 x 2, checkpointing,
#            causal sdpa), ours with the course preset's speed settings (16 x 1), bf16 LoRA + per-layer
#            compile (4 x 4, checkpointing); the report gives each run's median s/step, its min-max and the
#            spread across repeats. STEPS (default 16) / WARMUP (4) trade steps for time: fewer, never missing runs
set -u
STAGE=${1:-explore}
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
  big3|serve5|serve6|serve6b|serve7|serve7b|serve7c|check8|decode10|decode15|decode15b|decode16) ;;
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
case "$STAGE" in
speed6)  # session 6 (issue 19): one GPU, each configuration twice in this call; ~5.5 min after prepare
  export CUDA_VISIBLE_DEVICES=0
  S="--steps ${STEPS:-16} --warmup ${WARMUP:-4} --repeats 2"
  OURS="--batch 16 --ckpt --fused-loss --compile --attn flex_attention --extra-set fp32_upcast=false"
  # the standard stacks at their fastest attention (causal: a packed row is one sequence; the report marks it);
  # ours last: its compile is the longest (~2 min cold, the second repeat reads the inductor cache) and it gets
  # what is left of the deadline -- a repeat cut short still leaves the first one's result
  step plain_qlora 120 $TS run --impl plain_qlora --root $R --name plain_qlora --batch 8 --accum 2 --ckpt --attn causal $S
  step bf16_lora 150 $TS run --impl bf16_lora --root $R --name bf16_lora --batch 4 --accum 4 --ckpt --compile --attn causal $S
  step ours 260 env TORCH_LOGS=recompiles $TS run --impl ours --root $R --name ours $OURS $S
  echo "ours: $(grep -c 'Recompiling function' $L/ours.log) recompiles (the first step's are expected; the epoch ends at step 23: STEPS=24 crosses it)"
  DEADLINE=$(( DEADLINE + 30 )) step report 30 $TS report $R --baseline plain_qlora --ours ours --budget 24
  cat $L/report.log
  ;;
train8)  # session 8 (issue 19): `bits: auto` (bf16 LoRA when the weights fit the budget) with our speed fields, beside
  # the course preset's QLoRA (bits 4) and plain QLoRA, once each in this call (one GPU)
  export CUDA_VISIBLE_DEVICES=0
  S="--steps ${STEPS:-16} --warmup ${WARMUP:-4} --repeats 1"
  OURS="--batch 16 --ckpt --fused-loss --compile --attn flex_attention --extra-set fp32_upcast=false"
  step plain_qlora 110 $TS run --impl plain_qlora --root $R --name plain_qlora --batch 8 --accum 2 --ckpt --attn causal $S
  step ours_auto 200 $TS run --impl ours --root $R --name ours_auto $OURS --extra-set bits=auto $S
  step ours 200 $TS run --impl ours --root $R --name ours $OURS $S
  DEADLINE=$(( DEADLINE + 30 )) step report 30 $TS report $R --baseline plain_qlora --ours ours_auto --budget 24
  cat $L/report.log
  ;;
train9)  # session 9 (issue 19): train8's runs plus where bf16 LoRA's time goes -- half the layers recomputed
  # (checkpoint_fraction 0.5: bf16 weights leave room for the activations) and LoRA dropout 0 (PEFT draws one
  # dropout mask per adapted linear: 7 a layer); plain QLoRA is the baseline of every ratio (one GPU, once each)
  export CUDA_VISIBLE_DEVICES=0
  S="--steps ${STEPS:-16} --warmup ${WARMUP:-4} --repeats 1"
  OURS="--batch 16 --ckpt --fused-loss --compile --attn flex_attention --extra-set fp32_upcast=false"
  step plain_qlora 100 $TS run --impl plain_qlora --root $R --name plain_qlora --batch 8 --accum 2 --ckpt --attn causal $S
  step ours 170 $TS run --impl ours --root $R --name ours $OURS $S
  step ours_auto 130 $TS run --impl ours --root $R --name ours_auto $OURS --extra-set bits=auto $S
  step ours_auto_ck50 100 $TS run --impl ours --root $R --name ours_auto_ck50 $OURS --ckpt-fraction 0.5 --extra-set bits=auto $S
  step ours_auto_nodrop 100 $TS run --impl ours --root $R --name ours_auto_nodrop $OURS --ckpt-fraction 0.5 \
    --extra-set bits=auto --extra-set lora_dropout=0 $S
  DEADLINE=$(( DEADLINE + 30 )) step report 30 $TS report $R --baseline plain_qlora --ours ours_auto_ck50 --budget 24
  cat $L/report.log
  ;;
course9b)  # session 9: one9's course rows again after PEFT's fp32 copies of the adapters' inputs went (autocast)
  export CUDA_VISIBLE_DEVICES=0
  C="python3 bench/course_e2e.py --model $R/model-internlm2-1.8b --data $R/data.jsonl"
  step course_auto_inproc 130 $C --work $R/runs/course_auto_inproc --set bits=auto --merge-to
  step course_shipped 130 $C --work $R/runs/course_shipped
  ;;
one9)  # session 9 (issue 19), ONE call for all of it (the device budget left one): plain QLoRA (the baseline of every
  # training ratio), ours with `bits: auto` (bf16 LoRA), the course's job with bits auto merged in the training process
  # against the course's job as shipped (same call), then bits auto with half the layers recomputed if time is left
  export CUDA_VISIBLE_DEVICES=0
  S="--steps ${STEPS:-12} --warmup ${WARMUP:-3} --repeats 1"
  OURS="--batch 16 --ckpt --fused-loss --compile --attn flex_attention --extra-set fp32_upcast=false"
  C="python3 bench/course_e2e.py --model $R/model-internlm2-1.8b --data $R/data.jsonl"
  step plain_qlora 80 $TS run --impl plain_qlora --root $R --name plain_qlora --batch 8 --accum 2 --ckpt --attn causal $S
  step ours_auto 160 $TS run --impl ours --root $R --name ours_auto $OURS --extra-set bits=auto $S
  step course_auto_inproc 130 $C --work $R/runs/course_auto_inproc --set bits=auto --merge-to
  step course_shipped 140 $C --work $R/runs/course_shipped
  step ours_auto_ck50 90 $TS run --impl ours --root $R --name ours_auto_ck50 $OURS --ckpt-fraction 0.5 --extra-set bits=auto $S
  DEADLINE=$(( DEADLINE + 30 )) step report 30 $TS report $R --baseline plain_qlora --ours ours_auto --budget 24
  cat $L/report.log
  ;;
train10)  # session 10 (issue 19): session 9's fix (no fp32 copies of the adapters' inputs under autocast) measured:
  # the course's job as shipped against bits auto merged in the training process, then plain QLoRA against bits auto
  export CUDA_VISIBLE_DEVICES=0
  S="--steps ${STEPS:-12} --warmup ${WARMUP:-3} --repeats 1"
  OURS="--batch 16 --ckpt --fused-loss --compile --attn flex_attention --extra-set fp32_upcast=false"
  C="python3 bench/course_e2e.py --model $R/model-internlm2-1.8b --data $R/data.jsonl"
  step course_auto_inproc 130 $C --work $R/runs/course_auto_inproc --set bits=auto --merge-to
  step course_shipped 130 $C --work $R/runs/course_shipped
  step plain_qlora 80 $TS run --impl plain_qlora --root $R --name plain_qlora --batch 8 --accum 2 --ckpt --attn causal $S
  step ours_auto 150 $TS run --impl ours --root $R --name ours_auto $OURS --extra-set bits=auto $S
  DEADLINE=$(( DEADLINE + 30 )) step report 30 $TS report $R --baseline plain_qlora --ours ours_auto --budget 24
  cat $L/report.log
  ;;
train11)  # session 11 (issue 19): micro-batch against recomputation inside 24 GiB, plain QLoRA the baseline
  export CUDA_VISIBLE_DEVICES=0
  S="--steps ${STEPS:-12} --warmup ${WARMUP:-3} --repeats 1"
  F="--fused-loss --compile --attn flex_attention --extra-set fp32_upcast=false"
  step plain_qlora 80 $TS run --impl plain_qlora --root $R --name plain_qlora --batch 8 --accum 2 --ckpt --attn causal $S
  step auto_2x8 120 $TS run --impl ours --root $R --name auto_2x8 --batch 2 --accum 8 $F --extra-set bits=auto $S
  step q4_2x8 120 $TS run --impl ours --root $R --name q4_2x8 --batch 2 --accum 8 $F $S
  step auto_4x4_ck25 110 $TS run --impl ours --root $R --name auto_4x4_ck25 --batch 4 --accum 4 --ckpt --ckpt-fraction 0.25 $F --extra-set bits=auto $S
  step auto_16 110 $TS run --impl ours --root $R --name auto_16 --batch 16 --ckpt $F --extra-set bits=auto $S
  DEADLINE=$(( DEADLINE + 30 )) step report 30 $TS report $R --baseline plain_qlora --ours auto_2x8 --budget 24
  cat $L/report.log
  ;;
decode10)  # session 10 (issue 19): compiled batch-1 decode cold then warm (the 600 tokens/s and < 10 s cold goals),
  # the streaming paths against plain generate, the slot batcher at 1 and 16 streams; 1.8B shape, SmolLM2's tokenizer
  M=$R/model-1.8b-smolvocab
  build_smol
  rm -rf /tmp/ind-decode
  D="python3 bench/decode_speed.py --model $M --impl compile --cache-dir /tmp/ind-decode --new-tokens 256 --repeats 3"
  step decode_cold 110 $D --out $R/decode_cold.json
  step decode_warm 70 $D --out $R/decode_warm.json
  BD="python3 bench/batch_decode.py --model $M --max-tokens 128 --repeats ${REPEATS:-3}"
  step core_stream 90 $BD --impl generate worker stream --streams 1 --max-tokens 64 --out $R/core_stream.json
  step core 90 $BD --impl generate slots --streams 1,16 --out $R/core.json
  serve6_tables
  python3 bench/decode_speed.py --table $R/decode_cold.json $R/decode_warm.json 2>/dev/null | tee -a $L/serve6_table.txt
  ;;
train15)  # session 15 (issue 19): plain QLoRA against bits auto as shipped (16 x 1, all layers recomputed, fused loss,
  # flex, compile), each run twice in the one call (issue 19's "a run is repeated in the same call")
  export CUDA_VISIBLE_DEVICES=0
  S="--steps ${STEPS:-12} --warmup ${WARMUP:-3} --repeats 2"
  OURS="--batch 16 --ckpt --fused-loss --compile --attn flex_attention --extra-set fp32_upcast=false"
  step plain_qlora 170 $TS run --impl plain_qlora --root $R --name plain_qlora --batch 8 --accum 2 --ckpt --attn causal $S
  step ours_auto 230 $TS run --impl ours --root $R --name ours_auto $OURS --extra-set bits=auto $S
  DEADLINE=$(( DEADLINE + 30 )) step report 30 $TS report $R --baseline plain_qlora --ours ours_auto --budget 24
  cat $L/report.log
  ;;
decode15)  # session 15 (issue 19): decode10 beside coordinate-descent tuning; 1.8B shape, SmolLM2's tokenizer
  M=$R/model-1.8b-smolvocab
  build_smol
  rm -rf /tmp/ind-plain /tmp/ind-cdt
  D="python3 bench/decode_speed.py --model $M --impl compile --new-tokens 256 --repeats 3"
  CDT="--inductor coordinate_descent_tuning=1"
  step decode_cold 110 $D --cache-dir /tmp/ind-plain --out $R/decode_cold.json
  step cdt_cold 200 $D --cache-dir /tmp/ind-cdt $CDT --out $R/cdt_cold.json
  step decode_warm 70 $D --cache-dir /tmp/ind-plain --out $R/decode_warm.json
  step cdt_warm 70 $D --cache-dir /tmp/ind-cdt $CDT --out $R/cdt_warm.json
  BD="python3 bench/batch_decode.py --model $M --max-tokens 64 --repeats ${REPEATS:-3}"
  step core_stream 100 $BD --impl generate worker stream --streams 1 --out $R/core_stream.json
  serve6_tables
  python3 bench/decode_speed.py --table $R/decode_cold.json $R/decode_warm.json $R/cdt_cold.json $R/cdt_warm.json \
    2>/dev/null | tee -a $L/serve6_table.txt
  ;;
decode16)  # session 16: the decode steps share decode_step.attend now; the compiled batch-1 decode and the slot
  # batcher with the code before and now, cold caches, in one call; 1.8B shape. The code before, unpacked here first:
  #   mkdir -p .whl/old && git archive b13ec2d bench inference trainer | tar -x -C .whl/old
  M=$R/model-1.8b-smolvocab
  build_smol
  D="python3 bench/decode_speed.py --model $M --new-tokens 256 --repeats 3 --impl compile"
  BD="python3 bench/batch_decode.py --model $M --max-tokens 128 --repeats 3 --streams 1,16 --impl slots"
  rm -rf /tmp/ind-old /tmp/ind-new
  step compile_old 110 bash -c "cd .whl/old && $D --cache-dir /tmp/ind-old --out $R/compile_old.json"
  step compile_new 110 $D --cache-dir /tmp/ind-new --out $R/compile_new.json
  step slots_old 120 bash -c "cd .whl/old && TORCHINDUCTOR_CACHE_DIR=/tmp/ind-old $BD --out $R/slots_old.json"
  TORCHINDUCTOR_CACHE_DIR=/tmp/ind-new step slots_new 120 $BD --out $R/slots_new.json
  ;;
decode15b)  # session 15 (issue 19): the shipped FAST_DECODE=tuned (decode_step.compile_options) against compile,
  # cold and warm, batch-1 and through the slot batcher at 1 and 16 streams; 1.8B shape, SmolLM2's tokenizer
  M=$R/model-1.8b-smolvocab
  build_smol
  rm -rf /tmp/ind-plain /tmp/ind-cdt
  D="python3 bench/decode_speed.py --model $M --new-tokens 256 --repeats 3"
  step compile_cold 110 $D --impl compile --cache-dir /tmp/ind-plain --out $R/compile_cold.json
  step tuned_cold 200 $D --impl tuned --cache-dir /tmp/ind-cdt --out $R/tuned_cold.json
  step compile_warm 70 $D --impl compile --cache-dir /tmp/ind-plain --out $R/compile_warm.json
  step tuned_warm 70 $D --impl tuned --cache-dir /tmp/ind-cdt --out $R/tuned_warm.json
  BD="python3 bench/batch_decode.py --model $M --max-tokens 128 --repeats ${REPEATS:-3} --streams 1,16"
  TORCHINDUCTOR_CACHE_DIR=/tmp/ind-plain step slots 120 $BD --impl slots --out $R/core.json
  TORCHINDUCTOR_CACHE_DIR=/tmp/ind-cdt step tuned_slots 200 $BD --impl tuned-slots --out $R/core_stream.json
  serve6_tables
  python3 bench/decode_speed.py --table $R/compile_cold.json $R/compile_warm.json $R/tuned_cold.json \
    $R/tuned_warm.json 2>/dev/null | tee -a $L/serve6_table.txt
  ;;
course9)  # session 9 (issue 19): the course's job end to end (bench/course_e2e.py) as shipped (QLoRA, then a second
  # `merge` process) against `bits: auto` (bf16 LoRA: no quantisation) merged in the training process (--merge-to)
  export CUDA_VISIBLE_DEVICES=0
  C="python3 bench/course_e2e.py --model $R/model-internlm2-1.8b --data $R/data.jsonl"
  step course_shipped 200 $C --work $R/runs/course_shipped
  step course_auto_inproc 200 $C --work $R/runs/course_auto_inproc --set bits=auto --merge-to
  step course_shipped_inproc 160 $C --work $R/runs/course_shipped_inproc --merge-to
  ;;
speed)   # session 2: the new speed fields against the baseline at 32k tokens per optimizer step; LLaVA
  S="--steps ${STEPS:-40} --warmup 8 --profile 2"
  NU="--extra-set fp32_upcast=false"
  (
    export CUDA_VISIBLE_DEVICES=0
    step base_mb8x2 200 $TS run --impl baseline --root $R --name base_mb8x2 --batch 8 --accum 2 --ckpt $S
    step llava 220 python3 bench/llava_gpu.py --steps 12 --warmup 3 --batch-sizes 1,4,16 --out $R/llava_gpu.json
    ${DECODE:-true}
  ) &
  (
    export CUDA_VISIBLE_DEVICES=1
    F="--ckpt --fused-loss --compile"
    step ours_flex_nu_mb16 240 $TS run --impl ours --root $R --name ours_flex_nu_mb16 --batch 16 $F --attn flex_attention $NU $S
    step ours_sdpa_nu_mb16 150 $TS run --impl ours --root $R --name ours_sdpa_nu_mb16 --batch 16 $F $NU $S
    step ours_flex_mb16 150 $TS run --impl ours --root $R --name ours_flex_mb16 --batch 16 $F --attn flex_attention $S
    step ours_flex_nu_mb8x2 150 $TS run --impl ours --root $R --name ours_flex_nu_mb8x2 --batch 8 --accum 2 $F --attn flex_attention $NU $S
  ) &
  wait
  DEADLINE=$(( DEADLINE + 30 )) step report 30 $TS report $R --baseline base_mb8x2 --budget 24
  cat $L/report.log
  ;;
final2)  # session 2: ours' best (from `speed`) to the end with a profile; decode variants; the course's job
  D="python3 bench/decode_speed.py --model $R/model-internlm2-1.8b"
  NU="--extra-set fp32_upcast=false"
  E2E_FAST="--set fused_loss=true --set batch_size=16 --set grad_accum=1 --set fp32_upcast=false"
  (
    export CUDA_VISIBLE_DEVICES=1
    step ours_final 240 $TS run --impl ours --root $R --name ours_final --batch 16 --ckpt --fused-loss --compile \
      --attn flex_attention $NU --steps 22 --warmup 5 --profile 2
    step course_e2e 200 python3 bench/course_e2e.py --model $R/model-internlm2-1.8b --data $R/data.jsonl \
      --work $R/runs/course $E2E_FAST --set gradient_checkpointing=false
  ) &
  (
    export CUDA_VISIBLE_DEVICES=0
    step decode_graph 90 $D --impl graph --profile 32 --out $R/decode_graph.json
    rm -rf /tmp/ind-decode
    step decode_compile_cold 200 $D --impl compile --cache-dir /tmp/ind-decode --profile 32 --out $R/decode_compile_cold.json
    step decode_compile_warm 100 $D --impl compile --cache-dir /tmp/ind-decode --out $R/decode_compile_warm.json
    python3 bench/decode_speed.py --table $R/decode_graph.json $R/decode_compile_cold.json $R/decode_compile_warm.json \
      | tee $L/decode_table.txt
    # the course's job again with compile + flex attention, on the inductor cache ours_final warmed
    step course_e2e_compiled 200 python3 bench/course_e2e.py --model $R/model-internlm2-1.8b --data $R/data.jsonl \
      --work $R/runs/course_c $E2E_FAST --set gradient_checkpointing=false --set compile=true \
      --set attn_implementation=flex_attention
  ) &
  wait
  DEADLINE=$(( DEADLINE + 30 )) step report 30 $TS report $R --baseline ours_final --budget 24
  cat $L/report.log
  ;;
explore)
  S="--steps 25 --warmup 6"
  (
    export CUDA_VISIBLE_DEVICES=0
    step base_mb8_ckpt 200 $TS run --impl baseline --root $R --name base_mb8_ckpt --batch 8 --ckpt $S
    step base_mb4x2_ckpt 200 $TS run --impl baseline --root $R --name base_mb4x2_ckpt --batch 4 --accum 2 --ckpt $S
    step ours_fce_mb8_ckpt 200 $TS run --impl ours --root $R --name ours_fce_mb8_ckpt --batch 8 --ckpt --fused-loss $S
    step ours_cmp_mb2x4 300 $TS run --impl ours --root $R --name ours_cmp_mb2x4 --batch 2 --accum 4 --fused-loss --compile $S
    step decode_generate 150 python3 bench/decode_speed.py --model $R/model-internlm2-1.8b --impl generate --out $R/decode_generate.json
    step decode_fast 150 python3 bench/decode_speed.py --model $R/model-internlm2-1.8b --impl graph --out $R/decode_graph.json
  ) &
  (
    export CUDA_VISIBLE_DEVICES=1
    step ours_cmp_mb8_ckpt 300 $TS run --impl ours --root $R --name ours_cmp_mb8_ckpt --batch 8 --ckpt --fused-loss --compile $S
    step ours_cmp_mb4x2 300 $TS run --impl ours --root $R --name ours_cmp_mb4x2 --batch 4 --accum 2 --fused-loss --compile $S
    step ours_cmp_mb8_ck50 300 $TS run --impl ours --root $R --name ours_cmp_mb8_ck50 --batch 8 --ckpt --ckpt-fraction 0.5 --fused-loss --compile $S
  ) &
  wait
  step report 60 $TS report $R --budget 24
  cat $L/report.log
  step tiny_multi 200 python3 bench/multi_gpu.py tiny --root $R --out $OUT
  ;;
final)
  : "${OURS:?set OURS to the run flags of our best variant}" "${BASE:?set BASE to the best baseline flags}"
  S="--steps ${STEPS:-200} --warmup 10"
  (
    export CUDA_VISIBLE_DEVICES=0
    step base_final 420 $TS run --impl baseline --root $R --name base_final $BASE $S
  ) &
  (
    export CUDA_VISIBLE_DEVICES=1
    step ours_final 420 $TS run --impl ours --root $R --name ours_final $OURS $S
    # the course's job end to end (bench/course_e2e.py); E2E: our speed settings as --set flags
    step course_e2e 300 python3 bench/course_e2e.py --model $R/model-internlm2-1.8b --data $R/data.jsonl \
      --work $R/runs/course ${E2E:-}
  ) &
  wait
  step report 60 $TS report $R --baseline base_final --ours ours_final --budget 24
  cat $L/report.log
  ;;
multi)
  : "${OURS:?set OURS to the run flags of our best variant}"
  S="--steps ${STEPS:-100} --warmup 10"
  step ours_1gpu 300 env CUDA_VISIBLE_DEVICES=0 $TS run --impl ours --root $R --name ours_1gpu $OURS $S
  step ours_2gpu 300 $TS run --impl ours --root $R --name ours_2gpu --gpus 2 $OURS $S
  step scaling 60 $TS report $R --baseline ours_1gpu --ours ours_2gpu --budget 200
  cat $L/scaling.log
  step big 420 python3 bench/multi_gpu.py big --root $R --shape qwen2.5-14b --steps 6
  ;;
scale3)
  P="--set gradient_checkpointing=true --set fused_loss=true --set fp32_upcast=false"   # the preset's switches
  MG="python3 bench/multi_gpu.py scaling --root $R --batch 16 --accum 2 --steps 30 --warmup 6"
  step scale_mb16_2048 300 $MG --max-length 2048 --limit-one 190 --limit-two 130 $P
  step scale_mb16_1024 220 $MG --max-length 1024 --limit-one 120 --limit-two 100 $P
  ;;
big3)
  step big_single 200 python3 bench/multi_gpu.py big --root $R --engine single --steps 3 --limit 190
  step big_fsdp 260 python3 bench/multi_gpu.py big --root $R --engine fsdp --steps 5 --limit 250
  ;;
serve5)  # session 5: many streams at once through the API (issue 17), the decode paths (issue 19), 1.8B shape
  # random weights with SmolLM2's real tokenizer (carried in .whl/smol-tok): ids decode to text as a trained
  # model's do; vocabulary 49,152 instead of InternLM2's 92,544
  M=$R/model-1.8b-smolvocab
  SL="python3 bench/serve_load.py --model $M --max-tokens 128 --repeats ${REPEATS:-3}"
  build_smol
  step serve_main 200 $SL --engine generate batched fast --streams 1,4,16 --out $R/serve_gpu.json
  [ "${SWITCH:-0}" = 1 ] && step serve_si1 80 $SL --engine batched --streams 1,16 --switch-interval 0.001 --out $R/serve_si1.json
  [ "${SWITCH:-0}" = 1 ] && step serve_si20 80 $SL --engine batched --streams 1,16 --switch-interval 0.02 --out $R/serve_si20.json
  [ "${SERIAL:-0}" = 1 ] && step serve_serial 120 $SL --engine serial --streams 1,4 --out $R/serve_serial.json
  [ -f .whl/diag.py ] && step diag 90 python3 .whl/diag.py $M
  [ "${COLD:-0}" = 1 ] && { rm -rf /tmp/ind-decode; step decode_cold 120 python3 bench/decode_speed.py --model $M \
    --impl compile --cache-dir /tmp/ind-decode --out $R/decode_cold.json; }
  python3 bench/serve_load.py --table $R/serve_gpu.json | tee $L/serve_table.txt
  grep -h DIAG $L/diag.log
  ;;
serve6)  # session 6 (issue 17): the slot batcher on the 1.8B shape (random weights, SmolLM2's tokenizer)
  M=$R/model-1.8b-smolvocab
  build_smol
  BD="python3 bench/batch_decode.py --model $M --max-tokens 128 --repeats ${REPEATS:-3}"
  step core_check 90 $BD --impl slots --streams 1,4 --max-tokens 16 --repeats 1 --out $R/core_check.json
  step core 200 $BD --impl generate slots dynamic --streams 1,4,16 --out $R/core.json
  step core_stream 60 $BD --impl generate stream --streams 1 --out $R/core_stream.json
  SL="python3 bench/serve_load.py --model $M --max-tokens 128 --repeats ${REPEATS:-3}"
  step serve_api 200 $SL --engine batched batched-dynamic --streams 1,4,16 --out $R/serve_api.json
  serve6_tables
  ;;
serve6b)  # session 6: after FLUSH_S; the streaming path's time (thread / drain / stream against generate)
  M=$R/model-1.8b-smolvocab
  build_smol
  BD="python3 bench/batch_decode.py --model $M --max-tokens 128 --repeats ${REPEATS:-2}"
  step core 100 $BD --impl slots dynamic --streams 1,4,16 --out $R/core.json
  step core_stream 100 $BD --impl generate thread drain worker stream --streams 1 --max-tokens 64 --out $R/core_stream.json
  step serve_api 150 python3 bench/serve_load.py --model $M --max-tokens 128 --repeats ${REPEATS:-2} --engine batched \
    --streams 1,4,16 --out $R/serve_api.json
  serve6_tables
  ;;
serve7)  # session 7 (issues 17, 19): the pipelined slot batcher against lockstep, greedy and sampled, in the core
  # and through the API; the streaming path (one worker thread) against generate; compiled decode cold and warm
  M=$R/model-1.8b-smolvocab
  build_smol
  BD="python3 bench/batch_decode.py --model $M --max-tokens 128 --repeats ${REPEATS:-2}"
  step core 120 $BD --impl slots slots-lockstep --streams 1,4,16 --out $R/core.json
  step core_sampled 90 $BD --impl slots slots-lockstep --streams 1,16 --temperature 0.7 --out $R/core_sampled.json
  step core_stream 90 $BD --impl generate worker stream --streams 1 --max-tokens 64 --out $R/core_stream.json
  step serve_api 150 python3 bench/serve_load.py --model $M --max-tokens 128 --repeats ${REPEATS:-2} --engine batched \
    --streams 1,4,16 --out $R/serve_api.json
  rm -rf /tmp/ind-decode
  D="python3 bench/decode_speed.py --model $M --impl compile --cache-dir /tmp/ind-decode --new-tokens 256 --repeats 3"
  step decode_cold 100 $D --out $R/decode_cold.json
  step decode_warm 60 $D --out $R/decode_warm.json
  serve6_tables
  [ -f $R/core_sampled.json ] && python3 bench/batch_decode.py --table $R/core_sampled.json | tee -a $L/serve6_table.txt
  python3 bench/decode_speed.py --table $R/decode_cold.json $R/decode_warm.json 2>/dev/null | tee -a $L/serve6_table.txt
  ;;
serve7b|serve7c)  # session 7: after every waiting request joins before the next step and the API clients exist before the
  # clock starts: the API at 1/4/16 streams, beside the core (greedy and sampled) in the same call
  M=$R/model-1.8b-smolvocab
  build_smol
  BD="python3 bench/batch_decode.py --model $M --max-tokens 128 --repeats ${REPEATS:-3}"
  step core 90 $BD --impl slots --streams 1,4,16 --out $R/core.json
  step core_sampled 60 $BD --impl slots --streams 1,16 --temperature 0.7 --out $R/core_sampled.json
  step serve_api 180 python3 bench/serve_load.py --model $M --max-tokens 128 --repeats ${REPEATS:-3} --engine batched \
    --streams 1,4,16 --out $R/serve_api.json
  serve6_tables
  [ -f $R/core_sampled.json ] && python3 bench/batch_decode.py --table $R/core_sampled.json | tee -a $L/serve6_table.txt
  ;;
diag17)  # session 17 (issue 19): where the time goes before changing anything -- the CUDA decode paths' greedy ids
  # after session 16's shared attend(), training profiles of bits auto and the course preset's QLoRA (2 steady steps
  # each, graph breaks logged), then one reply of compiled decode, default and tuned, under the profiler
  export CUDA_VISIBLE_DEVICES=0
  step smoke_decode 100 python3 bench/decode_speed.py --smoke --smoke-tokenizer .whl/tiny-base
  S="--steps 10 --warmup 3 --repeats 1 --profile 2"
  OURS="--batch 16 --ckpt --fused-loss --compile --attn flex_attention --extra-set fp32_upcast=false"
  TORCH_LOGS=graph_breaks step auto_prof 150 $TS run --impl ours --root $R --name auto_prof $OURS --extra-set bits=auto $S
  TORCH_LOGS=graph_breaks step q4_prof 150 $TS run --impl ours --root $R --name q4_prof $OURS $S
  M=$R/model-1.8b-smolvocab
  build_smol
  D="python3 bench/decode_speed.py --model $M --new-tokens 128 --repeats 2 --profile 64"
  step compile_prof 60 $D --impl compile --cache-dir /tmp/ind-plain --out $R/compile_prof.json
  step tuned_prof 80 $D --impl tuned --cache-dir /tmp/ind-cdt --out $R/tuned_prof.json
  for n in auto_prof q4_prof; do [ -f $R/runs/$n/profile.json ] && cp $R/runs/$n/profile.txt $L/$n-profile.txt; done
  ;;
check8)  # session 8: the compiled decode paths on CUDA after the q/k/v projection was shared (decode_step.project):
  # the smoke's greedy ids of graph and compile against generate, then serve7b's core rows and compiled decode again
  step smoke_decode 120 python3 bench/decode_speed.py --smoke --smoke-tokenizer .whl/tiny-base
  M=$R/model-1.8b-smolvocab
  build_smol
  BD="python3 bench/batch_decode.py --model $M --max-tokens 128 --repeats ${REPEATS:-3}"
  step core 90 $BD --impl generate slots --streams 1,16 --out $R/core.json
  D="python3 bench/decode_speed.py --model $M --impl compile --cache-dir /tmp/ind-decode --new-tokens 256 --repeats 3"
  step decode_cold 100 $D --out $R/decode_cold.json
  serve6_tables
  python3 bench/decode_speed.py --table $R/decode_cold.json 2>/dev/null | tee -a $L/serve6_table.txt
  ;;
esac
snap
echo "== suite done in $(( $(date +%s) - T0 )) s"

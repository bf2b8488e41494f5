# Training stages of bench/gpu_suite.sh (sourced by it, never run alone): the 1.8B shape's training speed
# against the standard stacks, and the course's job end to end. Each stage says its session and what it measured.
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
diag17)  # session 17 (issue 19), one call: the CUDA decode paths' greedy ids after session 16's shared attend();
  # compiled decode, default and tuned, cold (the >= 600 tokens/s and < 10 s goals, on whatever card comes), each
  # with one reply under the profiler; then training profiles of bits auto and the course preset's QLoRA (2 steady
  # steps each, graph breaks logged): where the time goes before changing anything
  export CUDA_VISIBLE_DEVICES=0
  step smoke_decode 100 python3 bench/decode_speed.py --smoke --smoke-tokenizer .whl/tiny-base
  M=$R/model-1.8b-smolvocab
  build_smol
  rm -rf /tmp/ind-plain /tmp/ind-cdt
  D="python3 bench/decode_speed.py --model $M --new-tokens 256 --repeats 3 --profile 64"
  step compile_cold 70 $D --impl compile --cache-dir /tmp/ind-plain --out $R/compile_cold.json
  step tuned_cold 90 $D --impl tuned --cache-dir /tmp/ind-cdt --out $R/tuned_cold.json
  python3 bench/decode_speed.py --table $R/compile_cold.json $R/tuned_cold.json 2>/dev/null | tee -a $L/decode_table.txt
  step prepare 120 $TS prepare --shape internlm2-1.8b --out $R --n 10001
  S="--steps 10 --warmup 3 --repeats 1 --profile 2"
  OURS="--batch 16 --ckpt --fused-loss --compile --attn flex_attention --extra-set fp32_upcast=false"
  TORCH_LOGS=graph_breaks step auto_prof 150 $TS run --impl ours --root $R --name auto_prof $OURS --extra-set bits=auto $S
  TORCH_LOGS=graph_breaks step q4_prof 150 $TS run --impl ours --root $R --name q4_prof $OURS $S
  ;;
train18)  # session 18 (issue 19), one short call: the course preset's QLoRA with the speed fields (ours at bits 4) with
  # the fused loss's chunks eager (OWN_ASSISTANT_FUSED_CHUNKS=eager: as shipped on CUDA before this session), then
  # compiled (as on the CPU; now the default under `compile`), then with LoRA dropout 0 (what PEFT's dropout mask per
  # adapted linear costs); diag17's profile put GEMMs at half the step and dropout kernels at ~8%. The first run pays
  # the cold compile (~115 s to its first step): give it 200 s
  export CUDA_VISIBLE_DEVICES=0
  S="--steps 10 --warmup 3 --repeats 1"
  OURS="--batch 16 --ckpt --fused-loss --compile --attn flex_attention --extra-set fp32_upcast=false"
  step q4_eager 200 env OWN_ASSISTANT_FUSED_CHUNKS=eager $TS run --impl ours --root $R --name q4_eager $OURS $S
  step q4_chunks 120 $TS run --impl ours --root $R --name q4_chunks $OURS $S
  step q4_nodrop 120 $TS run --impl ours --root $R --name q4_nodrop $OURS --extra-set lora_dropout=0 $S
  ;;
train19)  # session 18 (issue 19), for the next call: whole decoder layers compiled (the CPU's unit since session 18;
  # OWN_ASSISTANT_COMPILE_UNIT=layer) against the blocks CUDA ships, for the QLoRA preset (ours at bits 4) and bits
  # auto, each once, alternating after one cold compile of each; then bits auto's 2-step profile, which diag17 cut at
  # its 150 s limit (its cold compile alone took ~110 s), and the QLoRA preset with LoRA dropout 0 (train18 cut it)
  export CUDA_VISIBLE_DEVICES=0
  S="--steps 10 --warmup 3 --repeats 1"
  OURS="--batch 16 --ckpt --fused-loss --compile --attn flex_attention --extra-set fp32_upcast=false"
  step q4_blocks 200 $TS run --impl ours --root $R --name q4_blocks $OURS $S
  step q4_layer 200 env OWN_ASSISTANT_COMPILE_UNIT=layer $TS run --impl ours --root $R --name q4_layer $OURS $S
  step auto_blocks 200 $TS run --impl ours --root $R --name auto_blocks $OURS --extra-set bits=auto $S
  step auto_layer 200 env OWN_ASSISTANT_COMPILE_UNIT=layer $TS run --impl ours --root $R --name auto_layer $OURS \
    --extra-set bits=auto $S
  step auto_prof 120 $TS run --impl ours --root $R --name auto_prof $OURS --extra-set bits=auto $S --profile 2
  step q4_nodrop 120 $TS run --impl ours --root $R --name q4_nodrop $OURS --extra-set lora_dropout=0 $S
  ;;
esac

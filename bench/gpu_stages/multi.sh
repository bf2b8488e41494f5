# Several-GPU stages of bench/gpu_suite.sh (sourced by it, never run alone): DDP / FSDP scaling and the big
# shapes' full fine-tuning (they need a machine of 2+ GPUs).
case "$STAGE" in
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
esac

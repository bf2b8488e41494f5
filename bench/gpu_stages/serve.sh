# Decode and serving stages of bench/gpu_suite.sh (sourced by it, never run alone): batch-1 compiled decode,
# the slot batcher and the API under load, on the 1.8B shape with SmolLM2's tokenizer (build_smol).
case "$STAGE" in
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

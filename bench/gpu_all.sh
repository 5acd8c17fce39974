#!/usr/bin/env bash
# Every GPU benchmark in one device call (device time is scarce): the serving bench (and
# with STEPS naming them: the Triton kernel tests on the GPU, compiled kernel stats, Nsight Compute on two fused linears, the LoRA kernel bench, the fused LM head + argmax bench, the sampled draw bench, the label and prompt scoring bench, the fused decode linear bench, the
# chained decode layers bench, the decode step without torch.compile), the training bench with compiled, CUDA-graphed
# blocks, and on 2+ GPUs the DDP check. Each step has its own
# time limit (seconds, from the environment) and writes its JSON and log under $OUT/<step>;
# the last lines of each log are printed. Run bench/fetch_wheels.sh here first and carry .whl:
#   run(command="bash bench/gpu_all.sh", carry=[".whl"])
set -u
OUT=${OUT:-/tmp/gpu_all}
export PYTHONPATH=.
if ! python3 -c 'import pydantic, typer' 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then  # the GPU image
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:.
fi
export HF_HUB_OFFLINE=1

step() {  # step NAME SECONDS COMMAND...
  local name=$1 limit=$2
  shift 2
  mkdir -p "$OUT/$name"
  timeout "$limit" "$@" > "$OUT/$name/log.txt" 2>&1
  echo "rc=$?" >> "$OUT/$name/log.txt"
  echo "== $name"
  grep -v 'it/s' "$OUT/$name/log.txt" | tail -n "${TAIL:-22}"
}

want() { [[ " ${STEPS:-kernel_tests serve train ddp} " == *" $1 "* ]]; }  # STEPS: which steps run, in this order
KERNEL_TESTS=${KERNEL_TESTS:-tests/test_triton_ops.py tests/test_triton_linear.py tests/test_triton_attention.py tests/test_triton_argmax.py tests/test_triton_lm_head.py tests/test_lora_worker.py tests/test_triton_shrink_chain.py tests/test_triton_lora_few.py tests/test_decode_step.py tests/test_graphed_step.py tests/test_train_loop.py}
want kernel_tests && step kernel_tests "${KERNEL_TESTS_S:-150}" python3 -m pytest -q -p no:cacheprovider -rs $KERNEL_TESTS
want stats && step stats "${STATS_S:-120}" python3 bench/kernel_stats.py --out "$OUT/stats"
if want ncu; then  # Nsight Compute on one fused linear launch each (TASKTUNE_PDL=0: one kernel alone)
  for w in gate_up down; do
    step ncu_$w "${NCU_S:-120}" env TASKTUNE_PDL=0 /usr/local/cuda/bin/ncu --launch-skip 3 --launch-count 1 \
      -k regex:_decode_linear --section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats \
      --section Occupancy --section LaunchStats python3 bench/ncu_linear.py $w
  done
fi
want linear && step linear "${LINEAR_S:-240}" python3 bench/decode_linear_bench.py ${LINEAR_ARGS:-} --out "$OUT/linear"
want attention && step attention "${ATTENTION_S:-200}" python3 bench/decode_attention_bench.py --out "$OUT/attention"
want layers && step layers "${LAYERS_S:-150}" python3 bench/decode_layers_bench.py --out "$OUT/layers"
want lm_head && step lm_head "${LM_HEAD_S:-240}" python3 bench/lm_head_bench.py --out "$OUT/lm_head"
want sample && step sample "${SAMPLE_S:-120}" python3 bench/sample_bench.py --out "$OUT/sample"
want predict && step predict "${PREDICT_S:-240}" python3 bench/predict_bench.py --out "$OUT/predict"
want lora && step lora "${LORA_S:-120}" python3 bench/lora_kernel_bench.py --out "$OUT/lora/lora_kernel_bench.json"
want serve && step serve "${SERVE_S:-300}" python3 bench/serve_bench.py ${SERVE_ARGS:-} --out "$OUT/serve"
want serve_eager && step serve_eager "${SERVE_EAGER_S:-300}" \
  python3 bench/serve_bench.py --no-compile --skip-peft ${SERVE_EAGER_ARGS:-} --out "$OUT/serve_eager"
[ -n "${TRAIN_LOGS:-}" ] && export TORCH_LOGS=$TRAIN_LOGS  # an empty TORCH_LOGS breaks `import torch`
want train && step train "${TRAIN_S:-240}" python3 bench/train_bench.py --compile --cuda-graphs ${TRAIN_ARGS:-} --out "$OUT/train" \
  --results "$OUT/train/train_bench.json"
if want ddp && [ "$(python3 -c 'import torch; print(torch.cuda.device_count())')" -ge 2 ]; then
  step ddp "${DDP_S:-200}" python3 bench/ddp_check.py --results "$OUT/ddp/ddp_check.json"
fi

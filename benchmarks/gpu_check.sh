#!/usr/bin/env bash
# The checks that still need a GPU (issues 3 and 5), as one command for a short lease of one
# GPU: the most wanted first, each under its own time limit so that a slow one cannot
# starve the rest; each one's output goes to OUT_DIR/NAME.log, and one line per check here.
#
#   bash benchmarks/gpu_check.sh                   # all checks, in this order
#   bash benchmarks/gpu_check.sh blocks checks     # only these (a rerun of what timed out)
#   GPU_CHECK_SMOKE=1 bash benchmarks/gpu_check.sh # toy sizes: shows the commands work
#
#   cudnn      the cuDNN attention and LSTM tests (the mask and bias folding has not yet run
#              on a GPU)
#   gpt_bf16   train/lm.py, nanoGPT's GPU config in bfloat16, 500 steps: step time, losses
#   blocks     the blockwise kernel's tile sizes and head batching; dropout's two kernels
#   lstm       the LSTM's automatic choice (cuDNN) against the scan, Flax and PyTorch, at
#              two shapes
#   gpt_f32    train/lm.py as gpt_bf16 in float32 (the config's default), 200 steps
#   attention  causal attention fwd+bwd against jax.nn (XLA, cuDNN) and PyTorch SDPA
#   checks     every attention kernel against a float32 reference, with and without dropout;
#              the rows print as they finish, so a run stopped by the limit still reports
#
# OUT_DIR is $OUT (the device tool's folder that comes back), else ./gpu_check_out. The
# limits add up to 8 minutes. jaxattn runs from this checkout (PYTHONPATH), so only its
# dependencies need installing (benchmarks/README.md, "GPU", has the command for a machine
# that lacks some of them). Off a GPU it runs too (the cuDNN tests skip), which only shows
# that the commands work.
set -uo pipefail
cd "$(dirname "$0")/.."

all=(cudnn gpt_bf16 blocks lstm gpt_f32 attention checks)
names=("$@")
((${#names[@]})) || names=("${all[@]}")
for name in "${names[@]}"; do
  if [[ " ${all[*]} " != *" $name "* ]]; then
    echo "gpu_check.sh: unknown check '$name'; the checks are: ${all[*]}" >&2
    exit 2
  fi
done

out="${OUT:-gpu_check_out}"
mkdir -p "$out"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# JAX takes GPU memory as it needs it, leaving room for the PyTorch rows.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
python="${PYTHON:-python3}"

if [[ "${GPU_CHECK_SMOKE:-0}" == 1 ]]; then
  config=train/configs/tiny.py steps=(8 4) bench=(--smoke) lengths=(256)
  lstm=(--lstm-shapes 8x20x32x64 4x30x16x32)
else
  config=train/configs/shakespeare_char.py steps=(500 200) bench=(--repeats 3)
  lengths=(4096 16384)
  # Issue 5's shape, then a small batch over a long sequence, where cuDNN's fused steps
  # should gain most on the scan's per-step launches.
  lstm=(--lstm-shapes 64x200x256x512 8x1000x256x512)
fi

run() { # run NAME SECONDS COMMAND...: COMMAND under a time limit, its output in OUT_DIR
  local name=$1 limit=$2 start=$SECONDS rc
  shift 2
  timeout --kill-after=10 "$limit" "$@" >"$out/$name.log" 2>&1
  rc=$?
  printf '%-10s exit %3d  %4d s of %d\n' "$name" "$rc" "$((SECONDS - start))" "$limit"
}

lm() { # lm NAME SECONDS STEPS [FLAGS...]: train/lm.py, no samples, no compilation cache
  local name=$1 limit=$2 num_steps=$3
  shift 3
  run "$name" "$limit" "$python" train/lm.py --config="$config" --workdir="$work/$name" \
    --noprogress --compilation_cache= --num_samples=0 --config.num_steps="$num_steps" \
    --config.eval_every=$((num_steps / 4)) --config.eval_batches=20 \
    --config.checkpoint_every="$num_steps" "$@"
}

"$python" -c 'import jax, flax, optax; print("jax", jax.__version__, "flax", flax.__version__,
"optax", optax.__version__, "devices:", jax.devices())' 2>&1 | tee "$out/env.log"
for name in "${names[@]}"; do
  case "$name" in
    cudnn) run cudnn 90 "$python" -m pytest -q -p no:cacheprovider -rs \
      tests/ops/test_attention.py tests/ops/test_lstm.py -k cudnn ;;
    gpt_bf16) lm gpt_bf16 80 "${steps[0]}" --config.model.dtype=bfloat16 ;;
    gpt_f32) lm gpt_f32 40 "${steps[1]}" ;;
    blocks) run blocks 100 "$python" benchmarks/gpu.py --sections blocks "${bench[@]}" ;;
    lstm) run lstm 60 "$python" benchmarks/gpu.py --sections lstm "${lstm[@]}" "${bench[@]}" ;;
    attention) run attention 40 "$python" benchmarks/gpu.py --sections attention \
      --lengths "${lengths[@]}" "${bench[@]}" ;;
    checks) run checks 70 "$python" benchmarks/gpu.py --sections checks "${bench[@]}" ;;
  esac
done

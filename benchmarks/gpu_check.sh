#!/usr/bin/env bash
# The checks that still need a GPU (issues 3 and 5), as one command for a short lease of one
# GPU: the most wanted first, each under its own time limit so that a slow one cannot
# starve the rest; each one's output goes to OUT_DIR/NAME.log, and one line per check here.
#
#   bash benchmarks/gpu_check.sh                   # all checks, in this order
#   bash benchmarks/gpu_check.sh blocks checks     # only these (a rerun of what timed out)
#   GPU_CHECK_SMOKE=1 bash benchmarks/gpu_check.sh # toy sizes, 10x the limits: the commands work
#
#   cudnn      the cuDNN attention and LSTM tests (the mask and bias folding has not yet run
#              on a GPU)
#   gpt_bf16   train/lm.py, nanoGPT's GPU config in bfloat16, 500 steps: step time, losses
#   blocks     the blockwise kernel's tile sizes and head batching; dropout's two kernels
#   lstm       the LSTM's cuDNN path against the scan (the automatic choice since
#              2026-12-04), Flax and PyTorch, at two shapes
#   gpt_f32    train/lm.py as gpt_bf16 in float32 (the config's default), 200 steps
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

all=(cudnn gpt_bf16 blocks lstm gpt_f32 checks)
names=("$@")
((${#names[@]})) || names=("${all[@]}")
for name in "${names[@]}"; do
  known=0
  for check in "${all[@]}"; do [[ $name == "$check" ]] && known=1; done
  if ((!known)); then # (a substring test would pass "gpt_bf16 blocks", then run nothing)
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
  config=train/configs/tiny.py steps=(8 4) bench=(--smoke)
  # The limits budget a GPU lease; a toy run on a busy CPU (the test suite's) may take
  # several times the GPU's seconds without anything being wrong.
  limit_scale=10
  lstm=(--lstm-shapes 8x20x32x64 4x30x16x32)
else
  config=train/configs/shakespeare_char.py steps=(500 200) bench=(--repeats 3) limit_scale=1
  # Issue 5's shape, then a small batch over a long sequence, where cuDNN's fused steps
  # should gain most on the scan's per-step launches.
  lstm=(--lstm-shapes 64x200x256x512 8x1000x256x512)
fi

# timeout runs a check in a process group of its own, which Ctrl-C and a TERM to this
# script's group do not reach: on either, stop the running check, then this script.
child=
failed=()
stop() {
  if [[ -n $child ]]; then
    kill -TERM "$child" 2>/dev/null
    wait "$child"
  fi
  exit "$1"
}
trap 'stop 130' INT
trap 'stop 143' TERM

run() { # run NAME SECONDS COMMAND...: COMMAND under a time limit, its output in OUT_DIR
  local name=$1 limit=$(($2 * limit_scale)) start=$SECONDS rc
  shift 2
  # In the background: a signal interrupts `wait` at once, a foreground command only at its end.
  timeout --kill-after=10 "$limit" "$@" >"$out/$name.log" 2>&1 &
  child=$!
  wait "$child"
  rc=$?
  child=
  ((rc == 0)) || failed+=("$name")
  printf '%-10s exit %3d  %4d s of %d\n' "$name" "$rc" "$((SECONDS - start))" "$limit"
}

lm() { # lm NAME SECONDS STEPS [FLAGS...]: train/lm.py, no samples, no compilation cache
  local name=$1 limit=$2 num_steps=$3
  shift 3
  run "$name" "$limit" "$python" train/lm.py --config="$config" --workdir="$work/$name" \
    --noprogress --compilation_cache= --num_samples=0 --config.num_steps="$num_steps" \
    --config.eval_every=$((num_steps / 4)) --config.eval_batches=20 \
    --config.checkpoint_every="$num_steps" "$@"
  # The loop prints losses but not step times: those are in metrics.jsonl, whose workdir
  # the EXIT trap deletes.
  if [[ -f $work/$name/metrics.jsonl ]]; then
    { echo "--- $name/metrics.jsonl"; cat "$work/$name/metrics.jsonl"; } >>"$out/$name.log"
  fi
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
    checks) run checks 110 "$python" benchmarks/gpu.py --sections checks "${bench[@]}" ;;
  esac
done
# Every check ran; the script's own status says whether any failed or timed out.
if ((${#failed[@]})); then
  echo "gpu_check.sh: failed: ${failed[*]}" >&2
  exit 1
fi

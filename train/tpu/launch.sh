#!/usr/bin/env bash
# Train jaxattn on a Cloud TPU VM slice: create it, install, run the same command on every
# host, watch, stop, delete. Read train/tpu/README.md first (costs, GCS, preemption).
#
# Every setting is an environment variable with a default below; DRY_RUN=1 prints the
# gcloud commands instead of running them. Flags used are those of the gcloud reference
# pages for `compute tpus tpu-vm {create,ssh,scp,describe,delete}` and
# `compute tpus queued-resources {create,list,delete}`.
set -euo pipefail

# --- Settings -------------------------------------------------------------------------------
TPU_NAME="${TPU_NAME:-jaxattn}"                      # Name of the TPU VM (node).
ZONE="${ZONE:-europe-west4-b}"                       # Must offer ACCELERATOR_TYPE.
ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-v5litepod-16}" # e.g. v5litepod-16, v6e-16, v4-32.
RUNTIME_VERSION="${RUNTIME_VERSION:-v2-alpha-tpuv5-lite}" # v6e: v2-alpha-tpuv6e; v5p:
#                                                      v2-alpha-tpuv5; v4: tpu-ubuntu2204-base.
PROJECT="${PROJECT:-}"                # Empty: gcloud's configured core/project.
SPOT="${SPOT:-0}"                     # 1: Spot capacity (cheaper, preemptible).
QUEUED_RESOURCE="${QUEUED_RESOURCE:-${TPU_NAME}-qr}" # Name of the queued-resource request.
USE_QUEUED="${USE_QUEUED:-0}"         # 1: `delete` removes the queued resource and its node.
REPO_URL="${REPO_URL:-}"              # git URL to clone on the workers; empty: `sync` ships
#                                       this checkout instead (uncommitted files included).
REPO_REF="${REPO_REF:-main}"          # Branch, tag or commit of REPO_URL.
REMOTE_DIR="${REMOTE_DIR:-jaxattn}"   # Checkout on each worker, relative to $HOME.
REMOTE_VENV="${REMOTE_VENV:-jaxattn-venv}" # Virtual environment on each worker ($HOME/...).
PYTHON_VERSION="${PYTHON_VERSION:-3.12}"   # Current jax (0.10) needs Python >= 3.11.
SCRIPT="${SCRIPT:-train/lm.py}"       # or train/translate.py
CONFIG="${CONFIG:-train/configs/shakespeare_char.py}"
WORKDIR="${WORKDIR:-}"                # gs://BUCKET/path: seen by every host (checkpoints).
ALLOW_LOCAL_WORKDIR="${ALLOW_LOCAL_WORKDIR:-0}" # 1: accept a non-gs:// WORKDIR (one host).
RUN_NAME_GIVEN="${RUN_NAME:+1}"
RUN_NAME="${RUN_NAME:-$(basename "${WORKDIR:-run}")}" # Names the log and pid files.
WORKER="${WORKER:-0}"                 # Worker for `logs` and `ssh`.
FOLLOW="${FOLLOW:-0}"                 # 1: `logs` keeps following (tail -f).
START_CHECK_S="${START_CHECK_S:-10}"  # `run` reports a run that dies this soon (bad flags).
DRY_RUN="${DRY_RUN:-0}"               # 1: print commands, run nothing.

usage() {
  cat <<EOF
Usage: train/tpu/launch.sh COMMAND [TRAIN_FLAGS...]

Commands (settings are environment variables, on/off ones 0 or 1; see the top of this file):
  create          create the TPU VM slice now (gcloud compute tpus tpu-vm create)
  create-queued   queue a request for the slice (queued-resources create; SPOT=1 for Spot)
  status          describe the slice (and list queued resources)
  sync            copy this checkout to every worker (when REPO_URL is empty)
  install         on every worker: get the code, Python ${PYTHON_VERSION} venv, jax[tpu], gcsfs
  check           on every worker: join the cluster and print the devices each host sees
  run [FLAGS]     start \`python ${SCRIPT} --config=${CONFIG} --distributed
                  --workdir=\$WORKDIR FLAGS\` on every worker, in the background
  logs            print the run's log on worker \$WORKER (FOLLOW=1 to follow); the run
                  is named by WORKDIR (its last part) or RUN_NAME, for \`stop\` too
  ssh             open a shell on worker \$WORKER
  stop            send SIGTERM to the run on every worker (it checkpoints and exits)
  delete          delete the slice (and the queued resource, if one was used)

Examples:
  ACCELERATOR_TYPE=v5litepod-16 train/tpu/launch.sh create
  REPO_URL=https://github.com/you/jaxattn.git train/tpu/launch.sh install
  WORKDIR=gs://my-bucket/jaxattn/shakespeare train/tpu/launch.sh run --config.model.dtype=bfloat16
  DRY_RUN=1 WORKDIR=gs://b/run train/tpu/launch.sh run    # print, don't run
EOF
}

die() {
  echo "launch.sh: $*" >&2
  exit 2
}

# The on/off settings take 0 or 1: anything else (DRY_RUN=true, SPOT=yes) used to read as
# 0, so `DRY_RUN=true launch.sh create` created the slice and SPOT=yes billed on-demand.
check_flags() {
  local name
  for name in DRY_RUN SPOT USE_QUEUED ALLOW_LOCAL_WORKDIR FOLLOW; do
    case "${!name}" in
    0 | 1) ;;
    *) die "${name} must be 0 or 1, got '${!name}'" ;;
    esac
  done
}

# `logs` and `stop` find the run by RUN_NAME; without it or WORKDIR they looked for a run
# named "run", and `stop` reported "run is not running" while the real run went on.
need_run_name() {
  if [[ -z "${WORKDIR}" && -z "${RUN_NAME_GIVEN}" ]]; then
    die "set WORKDIR (the one given to \`run\`) or RUN_NAME: which run to $1"
  fi
}

# Quote one word for a POSIX shell, leaving plain words readable.
quote() {
  if [[ "$1" =~ ^[A-Za-z0-9_./:=@,+%-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

quote_all() {
  local out="" word
  for word in "$@"; do out+="${out:+ }$(quote "$word")"; done
  printf '%s' "$out"
}

# Run a command, or print it when DRY_RUN=1.
x() {
  if [[ "${DRY_RUN}" == 1 ]]; then
    quote_all "$@"
    echo
  else
    "$@"
  fi
}

project_flag=()
[[ -n "${PROJECT}" ]] && project_flag=("--project=${PROJECT}")

# `gcloud compute tpus tpu-vm SUBCOMMAND` with the zone and project.
tpu_vm() {
  local sub="$1"
  shift
  x gcloud compute tpus tpu-vm "${sub}" "$@" --zone="${ZONE}" ${project_flag[@]+"${project_flag[@]}"}
}

# Run a shell command on every worker of the slice at the same time.
on_all_workers() {
  tpu_vm ssh "${TPU_NAME}" --worker=all --command="$1"
}

# shellcheck disable=SC2016 # $HOME is expanded by the worker's shell, not here.
log_dir='$HOME/jaxattn-logs'

# Remote shell variables name, log and pid for RUN_NAME, quoted for the worker's shell (a
# RUN_NAME taken from a WORKDIR like gs://b/my run has a space); use them as "$log" etc.
run_vars() {
  printf 'name=%s; log=%s/%s; pid=%s/%s; ' "$(quote "${RUN_NAME}")" \
    "${log_dir}" "$(quote "${RUN_NAME}.log")" "${log_dir}" "$(quote "${RUN_NAME}.pid")"
}

cmd_create() {
  local spot=()
  [[ "${SPOT}" == 1 ]] && spot=(--spot)
  tpu_vm create "${TPU_NAME}" --accelerator-type="${ACCELERATOR_TYPE}" \
    --version="${RUNTIME_VERSION}" ${spot[@]+"${spot[@]}"}
}

cmd_create_queued() {
  local spot=()
  [[ "${SPOT}" == 1 ]] && spot=(--spot)
  x gcloud compute tpus queued-resources create "${QUEUED_RESOURCE}" --node-id="${TPU_NAME}" \
    --accelerator-type="${ACCELERATOR_TYPE}" --runtime-version="${RUNTIME_VERSION}" \
    --zone="${ZONE}" ${project_flag[@]+"${project_flag[@]}"} ${spot[@]+"${spot[@]}"}
}

cmd_status() {
  x gcloud compute tpus queued-resources list --zone="${ZONE}" ${project_flag[@]+"${project_flag[@]}"}
  tpu_vm describe "${TPU_NAME}"
}

cmd_sync() {
  local root archive
  root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
  archive="${TMPDIR:-/tmp}/jaxattn-src.tar.gz"
  # Tracked files plus untracked ones git does not ignore: no venvs, no workdirs.
  if [[ "${DRY_RUN}" == 1 ]]; then
    echo "git -C $(quote "${root}") ls-files -z -co --exclude-standard | tar -C $(quote "${root}") --null -T - -czf $(quote "${archive}")"
  else
    git -C "${root}" ls-files -z -co --exclude-standard |
      tar -C "${root}" --null -T - -czf "${archive}"
  fi
  x gcloud compute tpus tpu-vm scp "${archive}" "${TPU_NAME}:jaxattn-src.tar.gz" --worker=all \
    --zone="${ZONE}" ${project_flag[@]+"${project_flag[@]}"}
  on_all_workers "mkdir -p \$HOME/${REMOTE_DIR} && tar -xzf \$HOME/jaxattn-src.tar.gz -C \$HOME/${REMOTE_DIR}"
}

cmd_install() {
  local get_code="" venv="\$HOME/${REMOTE_VENV}" dir="\$HOME/${REMOTE_DIR}"
  if [[ -n "${REPO_URL}" ]]; then
    # Fetch-then-checkout works for branches, tags and commits, on a first or later install.
    get_code="if [ ! -d ${dir}/.git ]; then git clone $(quote "${REPO_URL}") ${dir}; fi && "
    get_code+="git -C ${dir} fetch origin $(quote "${REPO_REF}") && "
    get_code+="git -C ${dir} checkout --force FETCH_HEAD && "
  fi
  # The images' python3 may be older than jax needs; uv fetches a suitable interpreter.
  on_all_workers "set -e; ${get_code}{ test -f ${dir}/pyproject.toml || \
{ echo 'no checkout in ${dir}: set REPO_URL or run sync first' >&2; exit 1; }; } && \
python3 -m pip install --user --upgrade uv && \
{ [ -x ${venv}/bin/python ] || \$HOME/.local/bin/uv venv --python ${PYTHON_VERSION} --seed ${venv}; } && \
\$HOME/.local/bin/uv pip install --python ${venv}/bin/python --upgrade 'jax[tpu]' gcsfs -e \"${dir}[train]\" && \
${venv}/bin/python -c 'import jax, jaxattn; print(\"jax\", jax.__version__)'"
}

cmd_check() {
  # Run on all hosts at once: a slice's TPU runtime starts only when every host joins.
  on_all_workers "cd \$HOME/${REMOTE_DIR} && \$HOME/${REMOTE_VENV}/bin/python -c '
import jax
jax.distributed.initialize()
print(\"process\", jax.process_index(), \"of\", jax.process_count(), \"local devices\",
      jax.local_device_count(), \"global devices\", jax.device_count(), jax.devices()[0].device_kind)
'"
}

cmd_run() {
  if [[ -z "${WORKDIR}" ]]; then # (with ALLOW_LOCAL_WORKDIR=1 it ran --workdir= as "run")
    die "set WORKDIR=gs://BUCKET/path (or a folder every host sees, with ALLOW_LOCAL_WORKDIR=1)"
  fi
  if [[ "${WORKDIR}" != gs://* && "${ALLOW_LOCAL_WORKDIR}" != 1 ]]; then
    die "set WORKDIR=gs://BUCKET/path: every host must see the same checkpoints \
(ALLOW_LOCAL_WORKDIR=1 to override: a single-host slice, or a folder every host mounts)"
  fi
  local train
  # $HOME stays unquoted so the worker's shell expands it; the rest is quoted word by word.
  train="\$HOME/${REMOTE_VENV}/bin/python $(quote_all "${SCRIPT}" "--config=${CONFIG}" \
    --distributed "--workdir=${WORKDIR}" "$@")"
  # nohup + setsid + redirected stdio: the run outlives the ssh session that started it.
  on_all_workers "set -e; $(run_vars)mkdir -p ${log_dir}; \
if [ -f \"\$pid\" ] && kill -0 \"\$(cat \"\$pid\")\" 2>/dev/null; then \
echo \"already running: \$name (pid \$(cat \"\$pid\"))\" >&2; exit 1; fi; \
cd \$HOME/${REMOTE_DIR}; setsid nohup ${train} > \"\$log\" 2>&1 < /dev/null & \
echo \$! > \"\$pid\"; sleep ${START_CHECK_S}; \
if ! kill -0 \"\$(cat \"\$pid\")\" 2>/dev/null; then \
echo \"\$name exited within ${START_CHECK_S}s on \$(hostname):\" >&2; tail -n 20 \"\$log\" >&2; exit 1; fi; \
echo \"started \$name on \$(hostname): pid \$(cat \"\$pid\"), log \$log\""
}

cmd_logs() {
  need_run_name "show the log of"
  local tail_cmd="tail -n 100"
  [[ "${FOLLOW}" == 1 ]] && tail_cmd="tail -n 100 -f"
  tpu_vm ssh "${TPU_NAME}" --worker="${WORKER}" --command="$(run_vars)${tail_cmd} \"\$log\""
}

cmd_ssh() {
  tpu_vm ssh "${TPU_NAME}" --worker="${WORKER}"
}

cmd_stop() {
  need_run_name stop
  on_all_workers "$(run_vars)if [ -f \"\$pid\" ] && kill -0 \"\$(cat \"\$pid\")\" 2>/dev/null; then \
kill -TERM \"\$(cat \"\$pid\")\" && echo \"SIGTERM sent to \$name on \$(hostname)\"; \
else echo \"\$name is not running on \$(hostname)\"; fi"
}

cmd_delete() {
  if [[ "${USE_QUEUED}" == 1 ]]; then
    # --force deletes the node of the request first.
    x gcloud compute tpus queued-resources delete "${QUEUED_RESOURCE}" --force --quiet \
      --zone="${ZONE}" ${project_flag[@]+"${project_flag[@]}"}
  else
    tpu_vm delete "${TPU_NAME}" --quiet
  fi
}

main() {
  if [[ $# -eq 0 ]]; then
    usage >&2
    exit 2
  fi
  local command="$1"
  shift
  [[ "${command}" == -h || "${command}" == --help || "${command}" == help ]] || check_flags
  case "${command}" in
  -h | --help | help) usage ;;
  create) cmd_create ;;
  create-queued) cmd_create_queued ;;
  status) cmd_status ;;
  sync) cmd_sync ;;
  install) cmd_install ;;
  check) cmd_check ;;
  run) cmd_run "$@" ;;
  logs) cmd_logs ;;
  ssh) cmd_ssh ;;
  stop) cmd_stop ;;
  delete) cmd_delete ;;
  *)
    echo "launch.sh: unknown command: ${command}" >&2
    usage >&2
    exit 2
    ;;
  esac
}

main "$@"

#!/usr/bin/env bash
# Start N training processes on this machine (127.0.0.1), as a multi-host run would, and
# wait for all of them. CPU only: for tests and for trying multi-process runs locally.
#
#   launch/local.sh N -- --config=configs/tiny_llama.py --workdir=/tmp/run [--config.KEY=V ...]
#
# Every process runs `python -m $GIST_LAUNCH_MODULE ARGS --coordinator_address=127.0.0.1:PORT
# --num_processes=N --process_id=i` (module default: gist_jax.train) on a free port, with
# GIST_DEVICES_PER_PROCESS forced CPU devices each (default 1; XLA's
# --xla_force_host_platform_device_count). Output lines are prefixed with "[i] ".
# If any process fails, the others are stopped and the script exits with its status.
# SIGTERM to this script is forwarded to every process (a preemption: all save, exit 0).
set -euo pipefail

if [[ $# -lt 1 || ! "$1" =~ ^[0-9]+$ || "$1" -lt 1 ]]; then
  echo "usage: $0 N -- ARGS..." >&2
  exit 2
fi
num_processes=$1
shift
if [[ "${1:-}" == "--" ]]; then
  shift
fi
module=${GIST_LAUNCH_MODULE:-gist_jax.train}
devices=${GIST_DEVICES_PER_PROCESS:-1}
python=${PYTHON:-python}

port=$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')

export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}
export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=${devices}"

pids=()
# SIGTERM/SIGINT to this script is passed on as SIGTERM: the training processes then save a
# checkpoint at a step they agree on and exit 0 (preemption), and so does this script.
forward_term() {
  for pid in "${pids[@]}"; do
    kill -TERM "$pid" 2>/dev/null || true
  done
}
trap forward_term INT TERM
# After a failure the survivors may be blocked in a collective with the dead process:
# ask them to stop, then kill whatever is left after a grace period.
abort_all() {
  forward_term
  for _ in $(seq 20); do
    alive=0
    for pid in "${pids[@]}"; do
      kill -0 "$pid" 2>/dev/null && alive=1
    done
    ((alive)) || return 0
    sleep 0.5
  done
  for pid in "${pids[@]}"; do
    kill -KILL "$pid" 2>/dev/null || true
  done
}

for ((i = 0; i < num_processes; i++)); do
  "$python" -u -m "$module" "$@" \
    --coordinator_address="127.0.0.1:${port}" \
    --num_processes="$num_processes" \
    --process_id="$i" \
    > >(sed -u "s/^/[$i] /") 2>&1 &
  pids+=("$!")
done

# Poll rather than `wait -n` so that this works with bash < 5.1 too.
status=0
running=("${pids[@]}")
while ((${#running[@]} > 0)); do
  still=()
  for pid in "${running[@]}"; do
    if kill -0 "$pid" 2>/dev/null; then
      still+=("$pid")
      continue
    fi
    set +e
    wait "$pid"
    rc=$?
    set -e
    if ((rc != 0 && status == 0)); then
      status=$rc
      echo "launch/local.sh: process $pid exited with status $rc; stopping the others" >&2
      abort_all
    fi
  done
  running=("${still[@]+"${still[@]}"}")
  ((${#running[@]} > 0)) && sleep 0.5
done
wait
exit "$status"

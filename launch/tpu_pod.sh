#!/usr/bin/env bash
# Run gist_jax training on every host of a Cloud TPU VM slice (one process per host).
#
#   launch/tpu_pod.sh TPU_NAME ZONE -- --config=configs/llama2_7b_alpaca.py --workdir=/mnt/shared/run1
#
# Runs `python -m gist_jax.train --distributed=auto ARGS` on all workers through
# `gcloud compute tpus tpu-vm ssh --worker=all`; JAX finds the other hosts itself (TPU
# metadata), so no coordinator flags are needed. Assumes gist_jax is installed on every
# worker and the repository is at $GIST_REPO_DIR (default: ~/gist_jax) on each of them,
# with the same converted checkpoint and data paths. The workdir must be storage that all
# hosts share (Filestore/NFS, or a gcsfuse mount): every host writes its checkpoint shards.
# Optional: GCLOUD_PROJECT, GIST_PYTHON (default python3), GIST_TPU_SSH_FLAGS.
# Preemption: a TERM on any host makes all hosts save at the same step and exit 0; rerun
# the same command to resume.
set -euo pipefail

if [[ $# -lt 2 ]]; then
  echo "usage: $0 TPU_NAME ZONE -- TRAIN_ARGS..." >&2
  exit 2
fi
tpu_name=$1
zone=$2
shift 2
if [[ "${1:-}" == "--" ]]; then
  shift
fi
repo_dir=${GIST_REPO_DIR:-'~/gist_jax'}
python=${GIST_PYTHON:-python3}
project_flag=()
if [[ -n "${GCLOUD_PROJECT:-}" ]]; then
  project_flag=(--project="$GCLOUD_PROJECT")
fi

# Quote the training arguments for the remote shell.
remote_args=$(printf ' %q' "$@")
command="cd ${repo_dir} && ${python} -m gist_jax.train --distributed=auto${remote_args}"

# shellcheck disable=SC2086  # GIST_TPU_SSH_FLAGS is a list of extra flags
exec gcloud compute tpus tpu-vm ssh "$tpu_name" \
  --zone="$zone" "${project_flag[@]}" \
  --worker=all \
  ${GIST_TPU_SSH_FLAGS:-} \
  --command="$command"

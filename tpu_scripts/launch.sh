#!/usr/bin/env bash
# Run `mone-jax prune` on every worker at once (one JAX process per host; --distributed lets
# jax.distributed find the others). Process 0 alone writes --out, --stats-out and --plan-out on its
# own disk; fetch them with: gcloud compute tpus tpu-vm scp --recurse --worker=0 "$TPU_NAME:OUT" . --zone="$ZONE"
# Usage: tpu_scripts/launch.sh --calib hf:allenai/c4:en --keep 32 --out pruned --mesh data=2,expert=4 [...]
# (paths are the workers' own; relative ones start in the remote home folder)
set -euo pipefail
source "$(dirname "$0")/env.sh"
ARGS=$(printf '%q ' "$@")
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all \
  --command="PATH=\$HOME/.local/bin:\$PATH mone-jax prune '$MODEL_DIR' --distributed --dtype bfloat16 --quiet $ARGS"

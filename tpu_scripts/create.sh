#!/usr/bin/env bash
# Create the TPU VM / pod slice. Extra flags go to gcloud, e.g. --spot, or a read-only disk that
# holds the model on every worker: --data-disk source=projects/P/zones/Z/disks/D,mode=read-only
set -euo pipefail
source "$(dirname "$0")/env.sh"
gcloud compute tpus tpu-vm create "$TPU_NAME" --zone="$ZONE" --accelerator-type="$TPU_TYPE" \
  --version="$TPU_VERSION" "$@"

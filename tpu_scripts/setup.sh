#!/usr/bin/env bash
# Build the mone-jax wheel here, copy it to every worker, install it with JAX for TPU, and (when
# HF_MODEL is set) download the model to MODEL_DIR on every worker.
set -euo pipefail
source "$(dirname "$0")/env.sh"
cd "$(dirname "$0")/.."
rm -rf dist && python3 -m pip wheel --no-deps -w dist .
WHEEL="$(basename dist/mone_jax-*.whl)"
gcloud compute tpus tpu-vm scp "dist/$WHEEL" "$TPU_NAME":~/ --zone="$ZONE" --worker=all
CMD="python3 -m pip install -q -U 'jax[tpu]' ~/$WHEEL"
if [ -n "$HF_MODEL" ]; then
  CMD="$CMD && python3 -m pip install -q -U huggingface_hub && \
hf download '$HF_MODEL' --local-dir '$MODEL_DIR' --include '*.json' '*.safetensors' '*.model' '*.txt' '*.jinja'"
fi
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all --command="$CMD"

# Settings shared by the tpu_scripts (source it, or export the variables before running a script).
# v5e, one host, 8 chips:   TPU_TYPE=v5litepod-8  TPU_VERSION=v2-alpha-tpuv5-lite
# v5p pod slice, 8 hosts:   TPU_TYPE=v5p-64       TPU_VERSION=v2-alpha-tpuv5   (v5p-N = N TensorCores = N/2 chips)
export TPU_NAME="${TPU_NAME:-mone}"
export ZONE="${ZONE:-us-central1-a}"
export TPU_TYPE="${TPU_TYPE:-v5litepod-8}"
export TPU_VERSION="${TPU_VERSION:-v2-alpha-tpuv5-lite}"
export MODEL_DIR="${MODEL_DIR:-/mnt/model}"        # Hugging Face folder, same path on every worker
export HF_MODEL="${HF_MODEL:-}"                     # hub id that setup.sh downloads to MODEL_DIR (optional)

#!/usr/bin/env bash
# Submit paper-birds training to a running Ray cluster (run from the repository root).
#   RAY_ADDRESS=http://127.0.0.1:8265 RAY_AUTH_MODE=token bash cluster/submit_train.sh s3://bucket/cub-128 s3://bucket/drc-runs 64 10
# Arguments: data, storage, workers (= GPUs, one each), CPUs per worker (default 4).
# With token auth (Ray's default) the client sends the token from RAY_AUTH_TOKEN or
# ~/.ray/auth_token when RAY_AUTH_MODE=token (cluster/README.md, section 5).
set -euo pipefail
DATA=${1:?Parquet dataset URI from pipelines.preprocess}
STORAGE=${2:?"shared checkpoint storage: s3://…, gs://… or an NFS path on every node"}
WORKERS=${3:-8}
CPUS_PER_WORKER=${4:-4}
: "${RAY_ADDRESS:?set RAY_ADDRESS to the dashboard of the cluster, e.g. http://127.0.0.1:8265}"
exec ray job submit --address "$RAY_ADDRESS" --working-dir . \
  --runtime-env cluster/runtime_env.yaml -- \
  python -m pipelines.train --preset paper-birds --data "$DATA" --storage "$STORAGE" \
    --workers "$WORKERS" --device cuda --cpus-per-worker "$CPUS_PER_WORKER" \
    --checkpoint-every 500 --eval-every 500 --grid-every 500

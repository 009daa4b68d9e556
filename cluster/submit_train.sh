#!/usr/bin/env bash
# Submit DRC training to a running Ray cluster (run from the repository root).
#   RAY_ADDRESS=http://<head>:8265 bash cluster/submit_train.sh s3://bucket/cub-128 s3://bucket/drc-runs 8
# With token auth (Ray's default), export RAY_AUTH_MODE=token and have ~/.ray/auth_token
# (or RAY_AUTH_TOKEN) from the cluster; `ray job submit` then authenticates.
set -euo pipefail
DATA=${1:?Parquet dataset URI from pipelines.preprocess}
STORAGE=${2:?shared checkpoint storage (s3://…, gs://… or an NFS path on every node)}
WORKERS=${3:-8}
: "${RAY_ADDRESS:?set RAY_ADDRESS to the cluster's dashboard, e.g. http://head:8265}"
exec ray job submit --address "$RAY_ADDRESS" --working-dir . \
  --runtime-env cluster/runtime_env.yaml -- \
  python -m pipelines.train --data "$DATA" --storage "$STORAGE" --preset paper-birds \
    --workers "$WORKERS" --gpu --checkpoint-every 500 --eval-every 0 --grid-every 500

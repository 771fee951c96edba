#!/usr/bin/env bash
# Submit an rltrain run to a running Ray cluster with `ray job submit` (docs/cluster.md):
#
#   RAY_ADDRESS=http://<head>:8265 launch/ray_job.sh <recipe> [key=value ...]
#
# The entrypoint, `python -m rltrain --config-name <recipe> cluster=$CLUSTER key=value ...`, runs on the
# head node; Ray sets RAY_ADDRESS for it, so cluster.address=auto joins this cluster. rltrain (with its
# dependencies) must be installed on every node, or set RLTRAIN_WORKING_DIR=<checkout> to upload a
# checkout as the job's working directory (without .venv, outputs, .git). Give run.dir on storage you can
# read afterwards: a relative one lands in the job's working directory on the head node.
#
# The head needs the jobs API, i.e. Ray's dashboard: `pip install 'rltrain[cluster]'` (ray[default]) there;
# without it this script stops with one line saying so, before `ray job submit`.
#
# Environment (all optional): RAY_ADDRESS (the Ray dashboard / jobs API, default http://127.0.0.1:8265);
# CLUSTER (the cluster/ option, default multi_node: 16 GPUs; `ray` keeps the recipe's own layout); RLTRAIN_PYTHON (the nodes' python, default python); RLTRAIN_WORKING_DIR; RAY_JOB_ARGS (extra
# `ray job submit` arguments, split on spaces, e.g. "--no-wait --submission-id my-run"); RAY (default ray).
# On a token-authenticated cluster export its RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH) first.
set -euo pipefail

if (($# < 1)); then
    echo "usage: RAY_ADDRESS=http://<head>:8265 $0 <recipe> [key=value ...]" >&2
    exit 2
fi
recipe=$1
shift
RAY=${RAY:-ray}
address=${RAY_ADDRESS:-http://127.0.0.1:8265}
read -r -a job_args <<<"${RAY_JOB_ARGS:-}"
if [[ -n ${RLTRAIN_WORKING_DIR:-} ]]; then
    job_args+=(--working-dir "$RLTRAIN_WORKING_DIR" --runtime-env-json '{"excludes": [".venv", "outputs", ".git"]}')
fi

# `ray job submit` against a head without the jobs API fails after a 60-line ConnectionError: ask it first.
probe='import sys, urllib.request
try:
    urllib.request.urlopen(sys.argv[1].rstrip("/") + "/api/version", timeout=10).read()
except Exception as err:
    sys.exit(f"{type(err).__name__}: {err}")'
if ! reason=$(python3 -c "$probe" "$address" 2>&1); then
    echo "launch/ray_job.sh: no Ray jobs API at $address ($reason): the head needs Ray's dashboard (pip install" \
        "'rltrain[cluster]' there, i.e. ray[default]; ray start --head then serves it on port 8265), or set RAY_ADDRESS" >&2
    exit 1
fi

exec "$RAY" job submit --address "$address" "${job_args[@]}" -- \
    "${RLTRAIN_PYTHON:-python}" -m rltrain --config-name "$recipe" "cluster=${CLUSTER:-multi_node}" "$@"

#!/usr/bin/env bash
# Submit a sweep to a running Ray cluster as a Ray job.
#
#   cluster/submit.sh SPACE [key=value ...]
#
# SPACE: the name of a search space shipped with the package (tiny, families, recipes/...), or a
# YAML file (a path relative to the repository root, which is uploaded as the job's working dir).
#
# Environment:
#   RAY_ADDRESS   the cluster's dashboard / job server (default http://127.0.0.1:8265;
#                 `ray up` prints it; for a remote cluster use `ray dashboard cluster/aws.yaml`
#                 to forward it to localhost)
#   RESULTS       where the sweep writes on the cluster (default /tmp/rayunlearn-results; the
#                 job's working dir is a temporary copy, so use a path that outlives it:
#                 shared storage (NFS/EFS/Filestore) on a multi-node cluster)
#   RUNTIME_ENV   runtime env file (default cluster/runtime_env.yaml; empty: none, when the
#                 package is installed on every node already)
#   NO_WAIT=1     return after submission (then: ray job status / ray job logs -f JOB_ID)
set -euo pipefail
cd "$(dirname "$0")/.."
if [ $# -lt 1 ]; then
  sed -n '2,18p' "$0"; exit 2
fi
SPACE="$1"; shift
export RAY_ADDRESS="${RAY_ADDRESS:-http://127.0.0.1:8265}"
RESULTS="${RESULTS:-/tmp/rayunlearn-results}"
RUNTIME_ENV="${RUNTIME_ENV-cluster/runtime_env.yaml}"
args=(--working-dir .)
[ -n "$RUNTIME_ENV" ] && args+=(--runtime-env "$RUNTIME_ENV")
[ "${NO_WAIT:-0}" = "1" ] && args+=(--no-wait)
exec ray job submit "${args[@]}" -- rayunlearn sweep "$SPACE" "results=$RESULTS" "$@"

#!/usr/bin/env bash
# Submit a training run to the Ray cluster at RAY_ADDRESS (its dashboard, e.g. http://127.0.0.1:8265) as a
# Ray job: this directory is uploaded as the job's working directory (without run folders, virtual
# environments, caches, .git, .env files and keys) and the job runs `sft-dist train CONFIG ARGS...`.
#
#   bash launch/submit.sh CONFIG [--set KEY=VALUE ...] [--resume auto|PATH] [submit options]
#
# Submit options (everything else goes to `sft-dist train`):
#   --no-wait             print the submission id and return; otherwise follow the logs to the end
#   --submission-id ID    the job's id (default: sft-dist-<config name>-<time>)
#   --pip FILE            install a requirements file into the job's environment (nodes without the project)
#   --image IMAGE         run the job in a container image (clusters whose nodes run podman)
#   --before COMMAND      run COMMAND in the job (on the head node, in the uploaded directory) before the
#                         training, e.g. --before "python launch/prepare_demo_model.py" for the quickstart
# Waiting, the script exits with the training run's own exit status (0 done, 1 failed, 2 bad input).
#
# The config's local paths are read where the job's driver runs, the head node: paths inside this
# directory travel with the upload; `.cache/` (prepared models, tokenized data) does not (large files do
# not belong in Ray's job upload): prepare them with --before, or name absolute paths on the head node.
# With an object-store (or shared-mount) ray.storage_path the run ships the data and model folder from
# the head to the other nodes itself.
#
# Nothing here needs editing. Token authentication: the token comes from RAY_AUTH_TOKEN or
# ~/.ray/auth_token (RAY_AUTH_TOKEN_PATH), never from a file in this directory; storage and tracker
# credentials also come from the environment of the cluster's nodes, not from uploaded files.
# Then: ray job status ID | ray job logs -f ID | ray job stop ID | ray job list
set -euo pipefail
cd "$(dirname "$0")/.."

if [ $# -lt 1 ] || [ "${1#-}" != "$1" ]; then
  sed -n '2,/^# Nothing here/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//' >&2
  exit 2
fi
config=$1
shift

wait=true
before=""
submission_id="sft-dist-$(basename "${config%.*}")-$(date +%Y%m%d-%H%M%S)"
env_extra=""
train_args=()
while [ $# -gt 0 ]; do
  case $1 in
    --no-wait) wait=false ;;
    --submission-id) submission_id=$2; shift ;;
    --pip) env_extra+=", \"pip\": \"$2\""; shift ;;
    --image) env_extra+=", \"image_uri\": \"$2\""; shift ;;
    --before) before=$2; shift ;;
    *) train_args+=("$1") ;;
  esac
  shift
done

# Clients of a token-protected cluster must say so; the token itself stays where the user keeps it.
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-token}
: "${RAY_ADDRESS:?set RAY_ADDRESS to the cluster dashboard, e.g. http://127.0.0.1:8265 (cluster/local/start.sh prints it)}"

excludes='"runs/", ".venv/", "venv/", ".cache/", ".git/", "__pycache__/", ".pytest_cache/", "*.egg-info/",
  ".env", "*.env", ".env.*", "*.pem", "*.key", "id_rsa*", "id_ed25519*", "*credentials*", ".netrc"'
# `ray job stop` sends SIGTERM, then SIGKILL after RAY_JOB_STOP_WAIT_TIME_S (Ray's default: 3 s): long
# enough here for the run to finish its step and save a checkpoint on the way out.
stop_env="\"env_vars\": {\"RAY_JOB_STOP_WAIT_TIME_S\": \"${SFT_DIST_STOP_WAIT_S:-120}\"}"
runtime_env="{\"working_dir\": \".\", \"excludes\": [$excludes], $stop_env$env_extra}"

submit=(ray job submit --submission-id "$submission_id" --runtime-env-json "$runtime_env")
# Ray joins the entrypoint's words with shlex, so every argument arrives as given (a URI's `&` included).
entrypoint=(sft-dist train "$config" "${train_args[@]}")
if [ -n "$before" ]; then
  # shellcheck disable=SC2016  # "$@" belongs to the job's shell
  entrypoint=(bash -c "$before"' && exec "$@"' sft-dist-job "${entrypoint[@]}")
fi
if ! $wait; then
  "${submit[@]}" --no-wait -- "${entrypoint[@]}"
  echo "submitted $submission_id"
  exit 0
fi
# `ray job submit` itself exits 1 for any failure; the job's driver exit code tells 1 from 2.
"${submit[@]}" -- "${entrypoint[@]}" || true
exec python - "$submission_id" <<'EOF'
import sys

from ray.job_submission import JobStatus, JobSubmissionClient

info = JobSubmissionClient().get_job_info(sys.argv[1])
print(f"job {sys.argv[1]}: {info.status.value}", file=sys.stderr)
if info.driver_exit_code is not None:
    sys.exit(info.driver_exit_code)
sys.exit(0 if info.status == JobStatus.SUCCEEDED else 1)
EOF

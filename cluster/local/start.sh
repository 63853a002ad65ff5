#!/usr/bin/env bash
# A real multi-node Ray cluster on this one machine: a head node and N worker nodes, each its own
# `ray start` (own raylet, own CPU count, own node labels), all on 127.0.0.1. For the tests and for
# trying the multi-node path (placement over nodes, job submission) without hardware.
#
#   eval "$(bash cluster/local/start.sh)"     # starts it (or finds it running) and exports its address
#   bash cluster/local/start.sh               # running: starts again the worker nodes that have stopped
#   ray job submit --working-dir . -- sft-dist train configs/tiny-cpu.yaml ...
#   bash cluster/local/stop.sh
#
# Nothing here needs editing; the environment overrides the defaults:
#   SFT_DIST_RAY_WORKER_NODES (1)   worker nodes besides the head
#   SFT_DIST_RAY_CPUS_PER_NODE (2)  logical CPUs of each node (head included)
#   SFT_DIST_RAY_PORT (6390)        GCS port; SFT_DIST_RAY_DASHBOARD_PORT (8275); SFT_DIST_RAY_CLIENT_PORT (6391)
#   SFT_DIST_RAY_TEMP_DIR (/tmp/sft_dist_ray)  sessions, logs and the node process ids
#   RAY_BIN (ray on PATH)           the `ray` of the environment the cluster runs in (and its sft-dist)
#   SFT_DIST_RAY_ISOLATE (unset)    folders (colon-separated) the worker nodes must not see: each worker
#                                   node runs in its own mount namespace with an empty tmpfs over each
#                                   (needs root), as a node that shares no disk with the head would
# Token authentication stays on: the token comes from RAY_AUTH_TOKEN if set, else ~/.ray/auth_token
# (generated on first use, mode 0600). It is never written anywhere else nor printed.
#
# stdout carries only `export` lines (for eval); progress goes to stderr.
set -euo pipefail

workers=${SFT_DIST_RAY_WORKER_NODES:-1}
cpus=${SFT_DIST_RAY_CPUS_PER_NODE:-2}
port=${SFT_DIST_RAY_PORT:-6390}
dashboard_port=${SFT_DIST_RAY_DASHBOARD_PORT:-8275}
# Below Ray's worker port range (10002-19999).
client_port=${SFT_DIST_RAY_CLIENT_PORT:-6391}
temp_dir=${SFT_DIST_RAY_TEMP_DIR:-/tmp/sft_dist_ray}
isolate=${SFT_DIST_RAY_ISOLATE:-}
ray_bin=${RAY_BIN:-$(command -v ray || true)}
pids_dir="$temp_dir/sft_dist_nodes"

log() { echo "start.sh: $*" >&2; }

if [ ! -x "$ray_bin" ]; then
  log "no ray found: activate the project's environment (e.g. source .venv/bin/activate) or set RAY_BIN"
  exit 1
fi

# The cluster's processes (and the jobs they run) use the tools of the environment `ray` comes from.
PATH="$(dirname "$ray_bin"):$PATH"
export PATH RAY_AUTH_MODE=token

print_exports() {
  echo "export RAY_ADDRESS=http://127.0.0.1:$dashboard_port"
  echo "export RAY_AUTH_MODE=token"
}

token_file=${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}
if [ -z "${RAY_AUTH_TOKEN:-}" ] && [ ! -s "$token_file" ]; then
  # umask 077: the token is readable by its owner only (Ray writes it 0644 otherwise).
  (umask 077 && "$ray_bin" get-auth-token --generate >/dev/null)
fi
# Also a token file from before (or from `ray get-auth-token` itself): only its owner may read it.
if [ -f "$token_file" ]; then
  chmod 600 "$token_file"
fi


# One node: `ray start --block` in its own session, so stop.sh ends exactly this node's process group
# (--block also makes the node's processes die with it). A worker node with SFT_DIST_RAY_ISOLATE set
# starts in a private mount namespace (unshare and bash exec into `ray start`, which keeps the pid).
start_node() {
  local name=$1 hide=()
  shift
  mkdir -p "$pids_dir"
  if [ "$name" != head ] && [ -n "$isolate" ]; then
    # shellcheck disable=SC2016  # $0 and $@ belong to the inner bash
    hide=(unshare --mount --propagation private bash -c \
      'IFS=:; for folder in $0; do mount -t tmpfs sft-dist-hidden "$folder"; done; exec "$@"' "$isolate")
  fi
  setsid "${hide[@]}" "$ray_bin" start --block --num-cpus "$cpus" --node-ip-address 127.0.0.1 --temp-dir "$temp_dir" \
    --dashboard-agent-listen-port 0 --disable-usage-stats --labels "sft-dist/node=$name" "$@" \
    >"$pids_dir/$name.log" 2>&1 &
  echo $! >"$pids_dir/$name.pid"
}

# Waits until the cluster reports `want` alive nodes; fails as soon as a node's `ray start` has exited.
wait_for_nodes() {
  local want=$1 alive=0 pid_file
  for _ in $(seq 120); do
    for pid_file in "$pids_dir"/*.pid; do
      if ! kill -0 "$(cat "$pid_file")" 2>/dev/null; then
        log "node $(basename "$pid_file" .pid) failed to start:"
        tail -n 5 "${pid_file%.pid}.log" >&2
        return 1
      fi
    done
    alive=$("$ray_bin" list nodes --address "127.0.0.1:$port" --filter state=ALIVE --limit 1000 2>/dev/null |
      grep -c "ALIVE" || true)
    [ "$alive" -ge "$want" ] && return 0
    sleep 1
  done
  log "only $alive of $want nodes came up; see $pids_dir/*.log"
  return 1
}

# A node whose `ray start` has exited but was not yet reaped (a zombie: where no init reaps the
# orphans) is not alive.
node_alive() {
  local pid
  pid=$(cat "$pids_dir/$1.pid" 2>/dev/null) || return 1
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && [ "$(sed 's/.*) //' "/proc/$pid/stat" 2>/dev/null | cut -d' ' -f1)" != Z ]
}

# Running already (the head's `ray start --block` is alive; asking Ray instead takes ~40 s to fail):
# worker nodes that have stopped since (a drill stopped one, or it crashed) are started again.
if node_alive head; then
  log "the cluster is already running (GCS 127.0.0.1:$port)"
  restarted=0
  for i in $(seq "$workers"); do
    if ! node_alive "worker-$i"; then
      log "starting worker node $i again"
      rm -f "$pids_dir/worker-$i.pid"
      start_node "worker-$i" --address "127.0.0.1:$port"
      restarted=$((restarted + 1))
    fi
  done
  [ "$restarted" = 0 ] || wait_for_nodes $((workers + 1))
  print_exports
  exit 0
fi

# A half-started cluster is torn down again, so the next start.sh begins from nothing.
trap 'log "start failed; stopping what was started"; bash "$(dirname "$0")/stop.sh"' ERR
log "starting the head node (GCS 127.0.0.1:$port, dashboard 127.0.0.1:$dashboard_port)"
start_node head --head --port "$port" --dashboard-host 127.0.0.1 --dashboard-port "$dashboard_port" \
  --ray-client-server-port "$client_port"
wait_for_nodes 1
for i in $(seq "$workers"); do
  log "starting worker node $i"
  start_node "worker-$i" --address "127.0.0.1:$port"
done
wait_for_nodes $((workers + 1))
log "$((workers + 1)) nodes up, $cpus CPUs each"
print_exports

#!/usr/bin/env bash
# Stops the cluster that cluster/local/start.sh started, and only it: each node's process group, by
# the id start.sh recorded (not `ray stop`, which would also end every other Ray on this machine).
# Safe to run when nothing is running. SFT_DIST_RAY_TEMP_DIR must match the one given to start.sh.
set -euo pipefail

temp_dir=${SFT_DIST_RAY_TEMP_DIR:-/tmp/sft_dist_ray}
pids_dir="$temp_dir/sft_dist_nodes"

alive() { kill -0 -- "-$1" 2>/dev/null; }

pids=()
for pid_file in "$pids_dir"/*.pid; do
  [ -e "$pid_file" ] || continue
  pids+=("$(cat "$pid_file")")
  rm -f "$pid_file"
done

# Worker nodes first, so they do not report the head's disappearance as a failure.
for (( i=${#pids[@]}-1; i>=0; i-- )); do
  alive "${pids[i]}" && kill -TERM -- "-${pids[i]}"
done
# All nodes get the same 10 s to end by themselves (waited for together, not one after another).
for _ in $(seq 20); do
  running=0
  for pid in "${pids[@]}"; do
    alive "$pid" && running=1
  done
  [ "$running" = 0 ] && break
  sleep 0.5
done
for pid in "${pids[@]}"; do
  if alive "$pid"; then
    kill -KILL -- "-$pid"
  fi
done
echo "stop.sh: stopped ${#pids[@]} node(s)" >&2

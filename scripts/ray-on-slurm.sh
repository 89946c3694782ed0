#!/usr/bin/env bash
# Start a Ray cluster on the nodes of the current SLURM allocation, run a command on it, stop it.
#
# Usage (inside an allocation: an sbatch script, or under salloc), with kdflow and ray installed
# and on PATH (activate the environment first), output_dir on a file system all nodes share:
#
#   #!/bin/bash
#   #SBATCH --nodes=4 --ntasks-per-node=1 --cpus-per-task=32 --gpus-per-node=4 --time=12:00:00
#   source .venv/bin/activate
#   scripts/ray-on-slurm.sh -- kdflow run study=cifar100_benchmark launcher=ray launcher.address=auto \
#       launcher.resources.num_cpus=8 launcher.resources.num_gpus=1
#
#   salloc -N 2 --cpus-per-task=16 scripts/ray-on-slurm.sh -- kdflow run study=quick launcher=ray launcher.address=auto
#
# The Ray head runs on the first node of $SLURM_JOB_NODELIST (`ray start --head --block` in an
# srun step), one Ray worker on each other node; each offers $SLURM_CPUS_PER_TASK CPUs (else the
# node's allocated CPUs) and the node's allocated GPUs. The head's port is 6379 + (job id % 1000),
# so two allocations sharing a node do not collide. Once the cluster has all its CPUs (or after
# $RAY_WAIT_S seconds, default 120: error), the command runs on this node with RAY_ADDRESS
# exported, and the script exits with its status after stopping the Ray steps.
# Ray's token authentication is on: the token ($RAY_AUTH_TOKEN, else ~/.ray/auth_token, made if
# missing) is exported with RAY_AUTH_MODE=token to every node and to the command.
set -euo pipefail

if [[ "${1:-}" != "--" || $# -lt 2 ]]; then
    echo "usage: $0 -- COMMAND [ARGS...]   (inside a SLURM allocation)" >&2
    exit 2
fi
shift
: "${SLURM_JOB_ID:?run this inside a SLURM allocation (sbatch or salloc)}"

mapfile -t nodes < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
head_node=${nodes[0]}
port=$((6379 + SLURM_JOB_ID % 1000))
cpus=${SLURM_CPUS_PER_TASK:-${SLURM_CPUS_ON_NODE:-1}}
gpus=${SLURM_GPUS_ON_NODE:-0}
expected_cpus=$((cpus * ${#nodes[@]}))
temp_dir=/tmp/ray-$SLURM_JOB_ID
step=(srun --overlap --nodes=1 --ntasks=1 --cpus-per-task="$cpus")

export RAY_AUTH_MODE=token
RAY_AUTH_TOKEN=${RAY_AUTH_TOKEN:-$(ray get-auth-token --generate 2>/dev/null)}
export RAY_AUTH_TOKEN
head_ip=$("${step[@]}" -w "$head_node" hostname -I | awk '{print $1}')
export RAY_ADDRESS="$head_ip:$port"
echo "ray-on-slurm: head on $head_node at $RAY_ADDRESS, ${#nodes[@]} nodes, $expected_cpus CPUs"

ray_steps=()
stop_ray() {
    if ((${#ray_steps[@]})); then
        kill -TERM "${ray_steps[@]}" 2>/dev/null || true
        wait "${ray_steps[@]}" 2>/dev/null || true
    fi
}
trap stop_ray EXIT

"${step[@]}" -w "$head_node" ray start --head --block --node-ip-address="$head_ip" --port="$port" \
    --num-cpus="$cpus" --num-gpus="$gpus" --include-dashboard=false --disable-usage-stats --temp-dir="$temp_dir" &
ray_steps+=($!)
for node in "${nodes[@]:1}"; do
    "${step[@]}" -w "$node" ray start --block --address="$RAY_ADDRESS" \
        --num-cpus="$cpus" --num-gpus="$gpus" --disable-usage-stats &
    ray_steps+=($!)
done

timeout "${RAY_WAIT_S:-120}" python - "$expected_cpus" <<'PY'
"""Wait until the Ray cluster at RAY_ADDRESS offers the expected number of CPUs."""
import sys
import time

import ray

ray.init(address="auto", logging_level="ERROR")
while ray.cluster_resources().get("CPU", 0) < float(sys.argv[1]):
    time.sleep(1)
print(f"ray-on-slurm: cluster up with {ray.cluster_resources()['CPU']:g} CPUs")
PY

status=0
"$@" || status=$?
exit "$status"

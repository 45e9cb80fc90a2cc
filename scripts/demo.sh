#!/usr/bin/env bash
# The main job on the local backend: create the accuracy and efficiency sweeps with a smoke
# setting (1 epoch on 5,000 training examples), run one agent per sweep in parallel (3 runs
# each), then list the sweeps with their best runs. Run scripts/setup.sh first.
set -euo pipefail
cd "$(dirname "$0")/.."
collective=.venv/bin/collective
project=${DEMO_PROJECT:-collective-demo}
runs=${DEMO_RUNS:-3}
smoke=(--set epochs=1 --set train_subset=5000)

accuracy_id=$($collective sweep create accuracy --backend local --project "$project" "${smoke[@]}" --quiet)
efficiency_id=$($collective sweep create efficiency --backend local --project "$project" "${smoke[@]}" --quiet)
echo "demo: sweeps $accuracy_id (accuracy) and $efficiency_id (efficiency) in project $project" >&2

# One agent per sweep, as in two terminals; each run's log is under .collective/runs/.
$collective agent "$accuracy_id" --count "$runs" &
accuracy_agent=$!
$collective agent "$efficiency_id" --count "$runs" &
efficiency_agent=$!
status=0
wait "$accuracy_agent" || status=$?
wait "$efficiency_agent" || status=$?

$collective sweep list --project "$project"
exit "$status"

#!/usr/bin/env bash
# `make serve`: a local Prefect stack for MammoFlow on this machine.
#   1. a Prefect server on 127.0.0.1:$PREFECT_SERVER_API_PORT (default 4200), state in .prefect/
#   2. the process work pool `mammoflow-pool` (created if missing)
#   3. the deployments of flows/deploy.py (nightly-validation, weekly-retrain, on-demand ones)
#   4. a process worker that runs them in this checkout
# Ctrl-C stops the worker and the server. Logs: .prefect/server.log, .prefect/worker.log.
#
# Environment:
#   PREFECT_SERVER_API_PORT  port of the server and UI          (default 4200)
#   PREFECT_SERVER_API_HOST  interface to listen on             (default 127.0.0.1)
#   PREFECT_HOME             server database, profiles and logs (default <project>/.prefect)
#   MAMMOFLOW_POOL           work pool name                     (default mammoflow-pool)
#   MAMMOFLOW_TZ             IANA time zone of the cron schedules (default UTC)
#   MAMMOFLOW_DASK_ADDRESS   Dask scheduler for the training tasks (default: none, one at a time)
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
BIN=${VENV:-$ROOT/.venv}/bin
HOST=${PREFECT_SERVER_API_HOST:-127.0.0.1}
PORT=${PREFECT_SERVER_API_PORT:-4200}
POOL=${MAMMOFLOW_POOL:-mammoflow-pool}
TRAIN_TAG=mammoflow-train

export PREFECT_HOME=${PREFECT_HOME:-$ROOT/.prefect}
export PREFECT_API_URL="http://$HOST:$PORT/api"
export PREFECT_SERVER_ANALYTICS_ENABLED=${PREFECT_SERVER_ANALYTICS_ENABLED:-false}
export PREFECT_SERVER_API_HOST=$HOST PREFECT_SERVER_API_PORT=$PORT
mkdir -p "$PREFECT_HOME"

for tool in prefect python; do
  [[ -x $BIN/$tool ]] || { echo "serve: $BIN/$tool not found; run 'make venv' first" >&2; exit 1; }
done
if curl -sf "$PREFECT_API_URL/health" >/dev/null 2>&1; then
  echo "serve: something already answers on $HOST:$PORT; set PREFECT_SERVER_API_PORT" >&2
  exit 1
fi

pids=()
stop() {
  trap - EXIT INT TERM
  # Each child leads its own process group (setsid): stop the group, children included.
  for pid in "${pids[@]}"; do kill -TERM -- "-$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    kill -KILL -- "-$pid" 2>/dev/null || true
  done
  wait 2>/dev/null || true
  echo "serve: stopped"
}
trap stop EXIT
trap 'stop; exit 130' INT TERM

echo "serve: starting the Prefect server (state in $PREFECT_HOME)"
setsid "$BIN/prefect" server start --host "$HOST" --port "$PORT" >"$PREFECT_HOME/server.log" 2>&1 &
pids+=($!)
for i in $(seq 240); do
  curl -sf "$PREFECT_API_URL/health" >/dev/null 2>&1 && break
  if ! kill -0 "${pids[0]}" 2>/dev/null || ((i == 240)); then
    echo "serve: the server did not come up; last lines of $PREFECT_HOME/server.log:" >&2
    tail -n 30 "$PREFECT_HOME/server.log" >&2
    exit 1
  fi
  sleep 0.5
done

# At most one training task at a time across all runs (2 cores); idempotent.
"$BIN/prefect" --no-prompt concurrency-limit create "$TRAIN_TAG" 1 >/dev/null
# Creates the process work pool if missing, then creates or updates every deployment.
tz_args=()
[[ -n ${MAMMOFLOW_TZ:-} ]] && tz_args=(--timezone "$MAMMOFLOW_TZ")
"$BIN/python" -m flows.deploy --pool "$POOL" --project-dir "$ROOT" "${tz_args[@]}"

setsid "$BIN/prefect" worker start --pool "$POOL" --type process >"$PREFECT_HOME/worker.log" 2>&1 &
pids+=($!)

cat <<EOF

  Prefect UI:   http://$HOST:$PORT
  API:          $PREFECT_API_URL
  Work pool:    $POOL (worker log: $PREFECT_HOME/worker.log)
  Run now:      PREFECT_API_URL=$PREFECT_API_URL $BIN/prefect deployment run mammoflow-data/nightly-validation

  Ctrl-C stops the worker and the server.
EOF

# Return when either child exits (or on Ctrl-C); the trap stops the other.
wait -n "${pids[@]}" || true
echo "serve: a child exited; see $PREFECT_HOME/*.log" >&2
exit 1

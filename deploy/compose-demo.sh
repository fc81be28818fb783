#!/usr/bin/env bash
# One command for a whole federation in containers: builds the image from the host binaries (offline),
# brings up a coordinator and N clients with docker compose, follows the run to the end, prints the
# coordinator's accuracy per round from its metrics, and tears everything down (`down -v`).
#
#   deploy/compose-demo.sh [N]        (what `make compose-demo CLIENTS=N` runs; N defaults to 4)
#
# Environment: the FL_* settings of deploy/docker-compose.yml (FL_ROUNDS=5, FL_PARTITION=iid|dirichlet,
# FL_ALPHA, ...), KEEP=1 to leave the containers and volumes up for a look, DEMO_TIMEOUT (seconds, 900).
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/.." && pwd)"
# shellcheck source=deploy/lib.sh
. "$here/lib.sh"

n="${1:-4}"
case "$n" in '' | *[!0-9]* | 0) echo "usage: $0 [N]   (N clients, at least 1)" >&2; exit 2 ;; esac
timeout_s="${DEMO_TIMEOUT:-900}"
# The demo publishes the coordinator on a free port of 127.0.0.1 unless told otherwise, so that it
# runs beside anything already on 7443.
export FL_PUBLISH="${FL_PUBLISH:-127.0.0.1:}"
project="${COMPOSE_PROJECT:-fedtext-demo}"

docker info >/dev/null 2>&1 || { echo "no Docker engine here (docker info failed)" >&2; exit 1; }
pick_compose
ensure_image "$root"
file="$(compose_file_for "$root" "$n")"
dc() { "${COMPOSE[@]}" -p "$project" -f "$file" "$@"; }

cleanup() {
  local rc=$?
  if [ "$rc" != 0 ]; then
    echo "--- last coordinator and client logs ---"
    dc logs --no-color --tail 30 2>&1 || true
  fi
  if [ "${KEEP:-0}" = 1 ]; then
    echo "KEEP=1: left running; remove with: ${COMPOSE[*]} -p $project -f $file down -v"
  else
    dc down -v --remove-orphans >/dev/null 2>&1 || true
  fi
  exit "$rc"
}
dc down -v --remove-orphans >/dev/null 2>&1 || true
trap cleanup EXIT
trap 'exit 130' INT TERM

echo "== ${COMPOSE[*]}: a coordinator and $n clients ($file)"
start=$(date +%s)
mkdir -p "$root/target/deploy"
up_log="$root/target/deploy/compose-up.log"
if ! dc up -d >"$up_log" 2>&1; then
  cat "$up_log" >&2
  exit 1
fi
coordinator="$(dc ps -q coordinator)"
up_s=$(($(date +%s) - start))
echo "== federation up in ${up_s} s (coordinator published on $(docker port "$coordinator" 7443/tcp | head -n 1));" \
  "following it (rounds: ${FL_ROUNDS:-5})"

printed=0
while :; do
  running="$(docker inspect -f '{{.State.Running}}' "$coordinator")"
  lines="$(coordinator_metrics "$coordinator" | format_rounds)"
  count="$(printf '%s' "$lines" | grep -c . || true)"
  if [ "$count" -gt "$printed" ]; then
    printf '%s\n' "$lines" | tail -n +"$((printed + 1))"
    printed="$count"
  fi
  [ "$running" = true ] || break
  if [ $(($(date +%s) - start)) -gt "$timeout_s" ]; then
    echo "the federation did not finish within ${timeout_s} s" >&2
    exit 1
  fi
  sleep 2
done

code="$(docker inspect -f '{{.State.ExitCode}}' "$coordinator")"
total_s=$(($(date +%s) - start))
if [ "$code" != 0 ]; then
  echo "the coordinator exited with status $code" >&2
  exit 1
fi
echo "== finished: $printed rounds in ${total_s} s"
# The global model on the held-out test split, which no client and no evaluation round has seen.
dc run --rm --no-deps -T coordinator \
  fl-client predict --model /var/lib/fedtext/model/final.safetensors --data /data/test.csv 2>/dev/null |
  awk '/^accuracy:/ { print "test set " $0 }'

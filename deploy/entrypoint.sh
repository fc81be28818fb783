#!/bin/sh
# Container entrypoint (installed as /usr/local/bin/fedtext-entrypoint). The first argument picks a role:
#
#   coordinator ARGS...      fl-coordinator serve ARGS, plus --tls-san NAME for each name in $FL_PUBLIC_NAMES
#   client ARGS...           enroll once with the join token in $FL_TOKEN_FILE (when the state directory
#                            holds no identity yet), then fl-client run ARGS
#   datagen OPTIONS...       generate a dataset and put one shard into each client's data volume (init step)
#   publish-token SRC DST    wait for the coordinator's join token at SRC and copy it to DST (init step)
#   anything else            run it as a command (fl-client predict ..., fl-coordinator health ..., sh)
#
# Roles end in `exec`, so the Rust binary is PID 1: it gets SIGTERM from `docker stop` and the healthcheck
# can read its command line.
set -eu

log() { printf 'fedtext-entrypoint: %s\n' "$*" >&2; }

# Value of option $1 in the remaining arguments (`--opt value` or `--opt=value`); empty when absent.
option_value() {
  name="$1"
  shift
  while [ $# -gt 0 ]; do
    case "$1" in
      "$name") [ $# -ge 2 ] && { printf '%s' "$2"; return 0; } ;;
      "$name"=*) printf '%s' "${1#*=}"; return 0 ;;
    esac
    shift
  done
  return 0
}

# Waits up to $2 seconds for file $1 to exist and be non-empty.
wait_for_file() {
  waited=0
  until [ -s "$1" ]; do
    if [ "$waited" -ge "$2" ]; then
      log "gave up after ${2}s waiting for $1"
      return 1
    fi
    sleep 1
    waited=$((waited + 1))
  done
}

role_coordinator() {
  # Names a client outside this host uses to reach the coordinator must be in its certificate, which is
  # issued on the first start; FL_PUBLIC_NAMES (comma-separated) adds them without editing the command.
  old_ifs="$IFS"
  IFS=','
  for name in ${FL_PUBLIC_NAMES:-}; do
    [ -n "$name" ] && set -- "$@" --tls-san "$name"
  done
  IFS="$old_ifs"
  # SECURE_AGGREGATION=1 turns secure aggregation on (clients need nothing: the round task says so).
  case "${SECURE_AGGREGATION:-0}" in
    1) set -- "$@" --secure-aggregation ;;
    0) ;;
    *) echo "SECURE_AGGREGATION must be 0 or 1, got '${SECURE_AGGREGATION}'" >&2; exit 2 ;;
  esac
  exec fl-coordinator serve "$@"
}

role_client() {
  state="$(option_value --state-dir "$@")"
  coordinator="$(option_value --coordinator "$@")"
  name="$(option_value --name "$@")"
  state="${state:-${FL_STATE_DIR:-/var/lib/fedtext}}"
  # enrollment.json is written last by `fl-client enroll`, so its presence means a complete identity.
  if [ ! -s "$state/enrollment.json" ]; then
    token_file="${FL_TOKEN_FILE:-/var/lib/fedtext-join/join-token}"
    log "no identity in $state yet; enrolling with the join token in $token_file"
    wait_for_file "$token_file" "${FL_JOIN_WAIT_SECS:-300}"
    # The token goes through the environment, not argv: other processes can read argv in /proc.
    FL_TOKEN="$(cat "$token_file")"
    export FL_TOKEN
    if [ -n "$name" ]; then
      fl-client enroll --coordinator "$coordinator" --state-dir "$state" --name "$name"
    else
      fl-client enroll --coordinator "$coordinator" --state-dir "$state"
    fi
    unset FL_TOKEN
  fi
  exec fl-client run "$@"
}

role_datagen() {
  # Options: --clients N and any `fl-client gen-data` option (--rows, --partition, --alpha, --seed, ...).
  # Writes /shards/coordinator/{eval,test}.csv and /shards/client-I/train.csv (shard I) for I in 1..N.
  clients=""
  # Rotate through the arguments once, keeping all but --clients in "$@".
  remaining=$#
  while [ "$remaining" -gt 0 ]; do
    arg="$1"
    shift
    remaining=$((remaining - 1))
    case "$arg" in
      --clients) clients="${1:-}"; shift; remaining=$((remaining - 1)) ;;
      --clients=*) clients="${arg#*=}" ;;
      *) set -- "$@" "$arg" ;;
    esac
  done
  [ -n "$clients" ] || { log "datagen needs --clients N"; exit 2; }
  if [ -s /shards/coordinator/eval.csv ]; then
    log "data already generated (found /shards/coordinator/eval.csv); keeping it"
    exit 0
  fi
  work="$(mktemp -d)"
  fl-client gen-data --out "$work" --shards "$clients" "$@"
  i=1
  while [ "$i" -le "$clients" ]; do
    # Each client volume receives only its own shard.
    install -m 0644 "$work/shard-$i.csv" "/shards/client-$i/train.csv"
    i=$((i + 1))
  done
  install -m 0644 "$work/test.csv" /shards/coordinator/test.csv
  # eval.csv last: it marks the data as complete for the check above.
  install -m 0644 "$work/eval.csv" /shards/coordinator/.eval.csv.tmp
  mv /shards/coordinator/.eval.csv.tmp /shards/coordinator/eval.csv
  rm -rf "$work"
  log "wrote $clients shards and the coordinator's eval/test sets"
}

role_publish_token() {
  src="$1"
  dst="$2"
  wait_for_file "$src" "${FL_JOIN_WAIT_SECS:-300}"
  umask 077
  cp "$src" "$dst.tmp"
  mv "$dst.tmp" "$dst"
  log "join token published to $dst"
}

role="${1:-}"
[ $# -gt 0 ] && shift
case "$role" in
  coordinator) role_coordinator "$@" ;;
  client) role_client "$@" ;;
  datagen) role_datagen "$@" ;;
  publish-token) role_publish_token "$@" ;;
  "") exec fl-coordinator --help ;;
  *) exec "$role" "$@" ;;
esac

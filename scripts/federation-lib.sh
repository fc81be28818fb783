# The one federation launcher, sourced (not run) by scripts/demo.sh, bench/federation.sh,
# bench/flower/compare.sh and deploy/lib.sh (which adds the container side). It starts a local
# coordinator and enrolled clients over mutual TLS on loopback, and formats metrics.jsonl.
#
#   fed_start_coordinator STATE LOG [serve args...]  sets FED_COORD (pid), FED_URL, FED_TOKEN
#   fed_enroll STATE_PREFIX N                         enrolls STATE_PREFIX-1 .. -N as client-1 .. -N
#   fed_run_clients STATE_PREFIX DATA_PREFIX LOGDIR N [run args...]
#                                                     client i trains on DATA_PREFIX-i.csv
#   fed_stop                                          kills what was started (install as an EXIT trap)
#   metrics_table / format_rounds                     metrics lines on stdin -> a table
#
# FL_BIN (target/release) is where the binaries are.

FL_BIN=${FL_BIN:-target/release}
FED_PIDS=()

fed_stop() {
  local p
  for p in "${FED_PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
}

fed_start_coordinator() {
  local state="$1" log="$2"
  shift 2
  [ -x "$FL_BIN/fl-coordinator" ] && [ -x "$FL_BIN/fl-client" ] || {
    echo "binaries missing in $FL_BIN: run make build" >&2
    return 1
  }
  rm -f "$state/listen-addr"
  "$FL_BIN/fl-coordinator" serve --listen 127.0.0.1:0 --state-dir "$state" "$@" >"$log" 2>&1 &
  FED_COORD=$!
  FED_PIDS+=("$FED_COORD")
  local _
  for _ in $(seq 1 1200); do
    [ -f "$state/listen-addr" ] && [ -f "$state/join-token" ] && break
    kill -0 "$FED_COORD" 2>/dev/null || { echo "the coordinator exited:" >&2; tail -20 "$log" >&2; return 1; }
    sleep 0.05
  done
  [ -f "$state/listen-addr" ] || { echo "the coordinator did not start listening; see $log" >&2; return 1; }
  FED_URL="https://localhost:$(cut -d: -f2 "$state/listen-addr")"
  FED_TOKEN=$(cat "$state/join-token")
}

fed_enroll() {
  local prefix="$1" n="$2" i
  for i in $(seq 1 "$n"); do
    "$FL_BIN/fl-client" enroll --coordinator "$FED_URL" --token "$FED_TOKEN" \
      --state-dir "$prefix-$i" --name "client-$i" >/dev/null
  done
}

fed_run_clients() {
  local prefix="$1" data="$2" logs="$3" n="$4" i
  shift 4
  for i in $(seq 1 "$n"); do
    "$FL_BIN/fl-client" run --coordinator "$FED_URL" --state-dir "$prefix-$i" --data "$data-$i.csv" \
      "$@" >"$logs/client-$i.log" 2>&1 &
    FED_PIDS+=("$!")
  done
}

# Reads metrics lines on stdin; prints "ROUND ACCURACY PARTICIPANTS" per line (participants: a
# count, or the length of a list). No jq needed.
metrics_table() {
  awk '
    function num(name,   s) {
      if (match($0, "[{,] *\"" name "\" *: *[-0-9.eE+]+")) {
        s = substr($0, RSTART, RLENGTH); sub(/^[^:]*: */, "", s); return s
      }
      return "nan"
    }
    function count(name,   s, n) {
      if (match($0, "[{,] *\"" name "\" *: *\\[[^]]*\\]")) {
        s = substr($0, RSTART, RLENGTH); sub(/^[^[]*\[/, "", s); sub(/\]$/, "", s)
        if (s ~ /^ *$/) return 0
        return gsub(/,/, ",", s) + 1
      }
      return num(name)
    }
    /"round"/ { print num("round"), num("accuracy"), count("participants") }
  '
}

# Reads metrics lines on stdin; prints "round N accuracy: 0.XXXX" per line.
format_rounds() {
  metrics_table | awk '{ if ($2 == "nan") printf "round %d accuracy: n/a\n", $1; else printf "round %d accuracy: %.4f (%d clients)\n", $1, $2, $3 }'
}

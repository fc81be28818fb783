#!/usr/bin/env bash
# Tests the compose federation for real, with faults, on a machine with a Docker engine:
#
#   1. the committed compose file is what gen-compose.sh writes; the image runs as a non-root user and
#      has a HEALTHCHECK; the coordinator turns healthy;
#   2. a client outside compose enrolls through the published port with the join token;
#   3. `docker kill` of a client mid-round: the round completes with the others, and the client,
#      started again with `compose start`, takes part in a later round;
#   4. `docker restart` of the coordinator mid-run: it resumes after the last completed round;
#   5. `docker network disconnect` of a client for longer than the round deadline: rounds go on
#      without it, and it takes part again after `docker network connect`;
#   6. the federation completes every round exactly once, everything exits 0, and the final accuracy
#      beats chance (0.1 for 10 classes) by a wide margin;
#   0. before all that, in a container of the base image (a fresh Debian without debootstrap):
#      deploy/make-base-image.sh installs debootstrap and builds a base image, and with no network it
#      stops with one instruction.
#
# Prints PASS/FAIL per check and exits 1 if any failed. Without a Docker engine it prints SKIP and exits 0.
#
#   deploy/test-compose.sh            (what `make compose-test` runs)
#   environment: KEEP=1 leaves the federation up; TEST_ROUNDS, TEST_ROUND_TIMEOUT, TEST_MIN_ACCURACY,
#   TEST_FRESH_BASE=0 (skip building a base image in a fresh container)
set -uo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/.." && pwd)"
# shellcheck source=deploy/lib.sh
. "$here/lib.sh"

if ! docker info >/dev/null 2>&1; then
  echo "SKIP: no Docker engine here (docker info failed); the compose tests did not run"
  exit 0
fi
if ! pick_compose 2>/dev/null; then
  echo "SKIP: Docker is here but neither \`docker compose\` nor \`docker-compose\`; the compose tests did not run"
  exit 0
fi

n=4
rounds="${TEST_ROUNDS:-60}"
round_timeout="${TEST_ROUND_TIMEOUT:-8}"
min_accuracy="${TEST_MIN_ACCURACY:-0.5}"
project="fedtext-test"
file="$here/docker-compose.yml"
failures=0
t_start=$(date +%s)

pass() { echo "PASS: $*"; }
fail() { echo "FAIL: $*"; failures=$((failures + 1)); }
note() { echo "      $*"; }
check() { # check DESCRIPTION COMMAND...: PASS when the command succeeds
  local what="$1"
  shift
  if "$@"; then pass "$what"; else fail "$what"; fi
}
stamp() { echo "[$(($(date +%s) - t_start))s] $*"; }

# ---- image and compose file -------------------------------------------------------------------------
t0=$(date +%s)
mkdir -p "$root/target/deploy"
if ! ensure_image "$root" >"$root/target/deploy/image.log" 2>&1; then
  cat "$root/target/deploy/image.log"
  fail "runtime image built from the host binaries"
  exit 1
fi
pass "runtime image built from the host binaries in $(($(date +%s) - t0)) s: $(grep '^image ' "$root/target/deploy/image.log")"
compose_file_current() { "$here/gen-compose.sh" --check >/dev/null 2>&1; }
check "deploy/docker-compose.yml is what \`deploy/gen-compose.sh 4\` writes" compose_file_current
image="${FEDTEXT_IMAGE:-fedtext:latest}"
user="$(docker image inspect -f '{{.Config.User}}' "$image")"
check "the image runs as a non-root user ($user)" test -n "$user" -a "$user" != root -a "$user" != 0
check "the image has a HEALTHCHECK" test -n "$(docker image inspect -f '{{if .Config.Healthcheck}}{{.Config.Healthcheck.Test}}{{end}}' "$image")"

# ---- the base image on a fresh machine ----------------------------------------------------------------
# A container of the base image is a fresh Debian: root, apt, no debootstrap. With the host's Docker
# socket and CLI it runs deploy/make-base-image.sh as a new user's machine would: (1) with the Debian
# mirror reachable it installs debootstrap and builds a base image; (2) with no network at all it
# stops with one instruction. TEST_FRESH_BASE=0 skips (1), which downloads about 40 MB.
fresh_base() { # fresh_base NETWORK IMAGE: runs make-base-image.sh --force IMAGE in a fresh container
  # The rootfs is built on a tmpfs that allows device nodes (the image's overlay may not).
  docker run --rm --cap-add SYS_ADMIN --network "$1" --tmpfs /tmp:rw,exec,dev,suid,size=1g \
    -v "$here:/deploy:ro" -v /var/run/docker.sock:/var/run/docker.sock \
    -v "$(command -v docker):/usr/local/bin/docker:ro" \
    "${BASE_IMAGE:-debian:bookworm-slim}" /deploy/make-base-image.sh --force "$2"
}
fresh_log="$root/target/deploy/fresh-base.log"
if fresh_base none fedtext-test/offline-base:latest >"$fresh_log" 2>&1; then
  fail "with no network and no debootstrap, make-base-image.sh stops (it exited 0)"
elif grep -q 'docker load -i base.tar' "$fresh_log"; then
  pass "with no network and no debootstrap, make-base-image.sh stops with one instruction ($(grep -c . "$fresh_log") lines)"
else
  cat "$fresh_log"
  fail "with no network and no debootstrap, make-base-image.sh stops with the docker load instruction"
fi
if [ "${TEST_FRESH_BASE:-1}" = 0 ]; then
  echo "SKIP: building a base image on a fresh machine (TEST_FRESH_BASE=0)"
else
  t0=$(date +%s)
  if fresh_base bridge fedtext-test/fresh-base:latest >"$fresh_log" 2>&1 &&
    grep -q 'installing it with apt-get' "$fresh_log" &&
    [ "$(docker run --rm fedtext-test/fresh-base:latest cat /etc/debian_version | cut -d. -f1)" = 12 ]; then
    pass "on a fresh machine without debootstrap, make-base-image.sh installs it and builds a bookworm base image ($(($(date +%s) - t0)) s)"
  else
    tail -n 20 "$fresh_log"
    fail "on a fresh machine without debootstrap, make-base-image.sh installs it and builds a base image"
  fi
  docker image rm -f fedtext-test/fresh-base:latest >/dev/null 2>&1 || true
fi

# ---- bring it up ------------------------------------------------------------------------------------
export FL_ROUNDS="$rounds" FL_ROUND_TIMEOUT="$round_timeout" FL_MIN_CLIENTS=2 FL_PUBLISH="127.0.0.1:"
dc() { "${COMPOSE[@]}" -p "$project" -f "$file" "$@"; }
ext_state="$(mktemp -d)"
cleanup() {
  if [ "$failures" != 0 ]; then
    echo "--- logs (last 25 lines per service) ---"
    dc logs --no-color --tail 25 2>&1 || true
  fi
  if [ "${KEEP:-0}" = 1 ]; then
    echo "KEEP=1: left up; remove with: ${COMPOSE[*]} -p $project -f $file down -v"
  else
    dc down -v --remove-orphans >/dev/null 2>&1 || true
  fi
  rm -rf "$ext_state"
}
dc down -v --remove-orphans >/dev/null 2>&1
trap cleanup EXIT
trap 'exit 130' INT TERM

stamp "${COMPOSE[*]} up: coordinator + $n clients, $rounds rounds, round deadline ${round_timeout}s"
t_up=$(date +%s)
if ! dc up -d >"$root/target/deploy/up.log" 2>&1; then
  cat "$root/target/deploy/up.log"
  fail "compose up"
  exit 1
fi
# Container ids, taken while everything runs: `compose ps` v2 lists stopped containers only with -a.
declare -A ids=()
for service in coordinator $(seq -f 'client-%g' 1 "$n"); do
  ids[$service]="$(dc ps -q "$service")"
done
coordinator="${ids[coordinator]}"
cid() { echo "${ids[$1]}"; }
network="$(docker inspect -f '{{range $k, $v := .NetworkSettings.Networks}}{{$k}} {{end}}' "$(cid client-1)" | awk '{print $1}')"

table() { coordinator_metrics "$coordinator" | metrics_table; }
last_round() { table | awk 'BEGIN { m = 0 } $1 > m { m = $1 } END { print m }'; }
# Waits until a round after $1 completes (or the coordinator stops); prints that round's number.
wait_round_after() {
  local after="$1" deadline=$(($(date +%s) + ${2:-120})) r
  while :; do
    r="$(last_round)"
    if [ "$r" -gt "$after" ]; then echo "$r"; return 0; fi
    [ "$(docker inspect -f '{{.State.Running}}' "$coordinator")" = true ] || return 1
    [ "$(date +%s)" -lt "$deadline" ] || return 1
    sleep 1
  done
}
participants_of() { table | awk -v r="$1" '$1 == r { p = $3 } END { print p + 0 }'; }
# First round after $1 with participants matching the awk condition $2 (on p); waits up to $3 s.
wait_round_where() {
  local after="$1" cond="$2" deadline=$(($(date +%s) + ${3:-120})) hit
  while :; do
    hit="$(table | awk -v a="$after" "\$1 > a { p = \$3; if ($cond) { print \$1; exit } }")"
    if [ -n "$hit" ]; then echo "$hit"; return 0; fi
    [ "$(docker inspect -f '{{.State.Running}}' "$coordinator")" = true ] || return 1
    [ "$(date +%s)" -lt "$deadline" ] || return 1
    sleep 1
  done
}

health=""
for _ in $(seq 1 90); do
  health="$(docker inspect -f '{{if .State.Health}}{{.State.Health.Status}}{{end}}' "$coordinator")"
  [ "$health" = healthy ] && break
  sleep 1
done
check "the coordinator's HEALTHCHECK (grpc.health.v1 over TLS) reports healthy" test "$health" = healthy

# ---- a client from outside: published port + join token --------------------------------------------
port="$(docker port "$coordinator" 7443/tcp | head -n 1 | sed 's/.*://')"
token="$(dc exec -T coordinator cat /var/lib/fedtext/join-token 2>/dev/null | tr -d '\r\n')"
# The host's own fl-client when there is one; else the image, on the host's network.
enroll_outside() {
  if [ -x "$root/target/release/fl-client" ]; then
    FL_TOKEN="$token" "$root/target/release/fl-client" enroll --coordinator "https://localhost:$port" \
      --state-dir "$ext_state" --name outside-host
  else
    docker run --rm --network host -e FL_TOKEN="$token" "$image" fl-client enroll \
      --coordinator "https://localhost:$port" --state-dir /tmp/outside --name outside-host
  fi
}
if [ -n "$port" ] && [ -n "$token" ] && enroll_outside >"$root/target/deploy/enroll.log" 2>&1; then
  pass "a client outside compose enrolls at https://localhost:$port (published port) with the join token"
else
  cat "$root/target/deploy/enroll.log" 2>/dev/null
  fail "a client outside compose enrolls through the published port with the join token"
fi

r="$(wait_round_after 0 180)" || r=""
if [ -n "$r" ]; then
  stamp "round $r done (participants $(participants_of "$r")); federation up after $(($(date +%s) - t_up)) s"
else
  fail "the first round completes within 180 s"
  exit 1
fi

# ---- docker kill of a client mid-round ---------------------------------------------------------------
wait_round_where 0 "p == $n" 120 >/dev/null
victim=client-2
# Right after a round completes the next one starts: the clients are downloading and training.
killed_at="$(wait_round_after "$(last_round)" 60 || last_round)"
docker kill "$(cid $victim)" >/dev/null
stamp "docker kill $victim as round $((killed_at + 1)) runs"
if r2="$(wait_round_where "$killed_at" "p == $((n - 1))" $((round_timeout * 4 + 30)))"; then
  pass "after docker kill of $victim, round $r2 completes with the other $((n - 1)) clients"
else
  fail "after docker kill of $victim, a round completes with the other $((n - 1)) clients"
  r2="$(last_round)"
fi
stamp "${COMPOSE[*]} start $victim"
dc start "$victim" >/dev/null 2>&1
if r3="$(wait_round_where "$r2" "p == $n" 120)"; then
  pass "$victim, started again with compose start, takes part in round $r3 ($n participants)"
else
  fail "$victim, started again with compose start, takes part in a later round"
  r3="$(last_round)"
fi

# ---- docker restart of the coordinator mid-run -------------------------------------------------------
before="$(wait_round_after "$(last_round)" 60 || last_round)"
started_before="$(docker inspect -f '{{.State.StartedAt}}' "$coordinator")"
stamp "docker restart coordinator as round $((before + 1)) runs"
docker restart "$coordinator" >/dev/null
started_after="$(docker inspect -f '{{.State.StartedAt}}' "$coordinator")"
resumed=0
for _ in $(seq 1 60); do
  resumed="$(docker logs "$coordinator" 2>&1 | grep -c 'resuming the federation')"
  [ "$resumed" -gt 0 ] && break
  sleep 1
done
if [ "$started_before" != "$started_after" ] && [ "$resumed" -gt 0 ]; then
  pass "the coordinator restarted and resumed its federation from its state volume"
else
  fail "the coordinator restarted and logged that it resumed its federation (\"resuming the federation\")"
fi
if r4="$(wait_round_after "$before" 180)"; then
  # Round numbers without a gap or a repeat are checked at the end; here: the run goes on.
  pass "after the restart the run goes on from round $((before + 1)) (round $r4 done)"
else
  fail "after the restart a round completes within 180 s (rounds so far: $(table | awk '{print $1}' | tr '\n' ' '))"
  r4="$(last_round)"
fi
if r5="$(wait_round_where "$r4" "p == $n" 120)"; then
  pass "all $n clients reconnect to the restarted coordinator (round $r5)"
else
  fail "all $n clients reconnect to the restarted coordinator"
  r5="$(last_round)"
fi

# ---- docker network disconnect of a client for longer than the deadline -----------------------------
victim=client-3
outage=$((round_timeout * 2 + 5))
cut_at="$(wait_round_after "$(last_round)" 60 || last_round)"
stamp "docker network disconnect $network $victim for ${outage}s (round deadline ${round_timeout}s)"
docker network disconnect "$network" "$(cid $victim)"
sleep "$outage"
during="$(table | awk -v a="$cut_at" '$1 > a && $3 < '"$n"' { print $1 }' | tr '\n' ' ')"
docker network connect "$network" "$(cid $victim)"
stamp "docker network connect $network $victim"
if [ -n "$during" ]; then
  pass "while $victim was cut off, rounds went on without it (rounds ${during% })"
else
  fail "while $victim was cut off, rounds went on without it (rounds after $cut_at: $(table | awk -v a="$cut_at" '$1 > a { printf "%s(p=%s) ", $1, $3 }'))"
fi
reconnected_at="$(last_round)"
if r6="$(wait_round_where "$reconnected_at" "p == $n" 150)"; then
  pass "$victim takes part again after reconnecting (round $r6)"
else
  fail "$victim takes part again after reconnecting"
fi

# ---- to the end ---------------------------------------------------------------------------------------
stamp "waiting for the federation to finish ($rounds rounds)"
code="$(timeout 600 docker wait "$coordinator" 2>/dev/null || echo timeout)"
check "the coordinator exits 0 after the last round (exit: $code)" test "$code" = 0
total_s=$(($(date +%s) - t_up))
rounds_seen="$(table | awk '{print $1}' | sort -n | tr '\n' ' ')"
expected="$(seq 1 "$rounds" | tr '\n' ' ')"
check "metrics hold rounds 1..$rounds exactly once each" test "$rounds_seen" = "$expected"
final="$(table | awk -v r="$rounds" '$1 == r { print $2 }')"
check "final accuracy ${final:-none} beats chance (0.1) by a wide margin (>= $min_accuracy)" \
  awk -v a="${final:-0}" -v m="$min_accuracy" 'BEGIN { exit !(a >= m) }'
check "the final model exists" \
  test -n "$(docker cp "$coordinator:/var/lib/fedtext/model/final.safetensors" - 2>/dev/null | tar -t 2>/dev/null)"
for i in $(seq 1 "$n"); do
  c="$(cid client-$i)"
  state="$(timeout 60 docker wait "$c" 2>/dev/null || echo timeout)"
  check "client-$i exits 0 when the federation ends (exit: $state)" test "$state" = 0
done
echo "accuracy per round: $(table | awk '{ printf "%.3f ", $2 }')" | fold -w 104 -s | sed 's/^/      /'
echo "participants per round: $(table | awk '{ printf "%s ", $3 }')" | fold -w 104 -s | sed 's/^/      /'
stamp "compose run ${total_s} s from up to the end"

if [ "$failures" = 0 ]; then
  echo "ALL PASSED"
else
  echo "$failures FAILED"
  exit 1
fi

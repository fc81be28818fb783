# Shared by compose-demo.sh and test-compose.sh (sourced, not run): the container side of the one
# federation launcher, scripts/federation-lib.sh, whose metrics formatting it reuses.
# shellcheck source=scripts/federation-lib.sh
. "$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/scripts/federation-lib.sh"

# Sets COMPOSE to the compose command this machine has: the v2 plugin (`docker compose`) when present,
# else docker-compose 1.x. FEDTEXT_COMPOSE overrides ("docker-compose", "docker compose").
pick_compose() {
  if [ -n "${FEDTEXT_COMPOSE:-}" ]; then
    read -r -a COMPOSE <<<"$FEDTEXT_COMPOSE"
  elif docker compose version >/dev/null 2>&1; then
    COMPOSE=(docker compose)
  elif command -v docker-compose >/dev/null 2>&1; then
    COMPOSE=(docker-compose)
  else
    echo "neither \`docker compose\` nor \`docker-compose\` is installed" >&2
    return 1
  fi
}

# Builds the binaries when they are missing, then the runtime image from them. With FEDTEXT_SKIP_BUILD=1
# the image named by FEDTEXT_IMAGE is used as it is (for instance one built from source with BuildKit).
ensure_image() {
  local root="$1"
  if [ "${FEDTEXT_SKIP_BUILD:-0}" = 1 ]; then
    docker image inspect "${FEDTEXT_IMAGE:-fedtext:latest}" >/dev/null ||
      { echo "FEDTEXT_SKIP_BUILD=1 but there is no image ${FEDTEXT_IMAGE:-fedtext:latest}" >&2; return 1; }
    return 0
  fi
  if [ ! -x "$root/target/release/fl-coordinator" ] || [ ! -x "$root/target/release/fl-client" ]; then
    echo "binaries missing; running make build"
    make -C "$root" build
  fi
  "$root/deploy/build-images.sh"
}

# The compose file for N clients: the committed one for 4, else one generated under target/deploy.
compose_file_for() {
  local root="$1" n="$2"
  if [ "$n" = 4 ]; then
    "$root/deploy/gen-compose.sh" --check >/dev/null || return 1
    echo "$root/deploy/docker-compose.yml"
  else
    mkdir -p "$root/target/deploy"
    "$root/deploy/gen-compose.sh" "$n" >"$root/target/deploy/docker-compose-$n.yml"
    echo "$root/target/deploy/docker-compose-$n.yml"
  fi
}

# Prints the coordinator's metrics.jsonl (empty before the first round). Works on running and stopped
# containers alike: docker cp reads the volume through the container.
coordinator_metrics() {
  docker cp "$1:/var/lib/fedtext/metrics.jsonl" - 2>/dev/null | tar -xO 2>/dev/null || true
}

#!/usr/bin/env bash
# Makes the base image the Dockerfile expects (default `debian:bookworm-slim`) on a machine that may
# have nothing but Docker. Does nothing when an image with that name already exists (--force rebuilds).
# Otherwise, the first route that works:
#   1. debootstrap: a minbase Debian bookworm rootfs from the mirror apt already uses, trimmed the way
#      the official slim image is, then `docker import`ed. Needs root; when debootstrap is missing and
#      apt-get works, it is installed first (`apt-get install debootstrap`, about 300 kB).
#   2. `docker pull debian:bookworm-slim`, where a registry can be reached.
#   3. Neither: stop with one instruction for this machine.
#
#   deploy/make-base-image.sh [--force] [IMAGE]
#
# Environment: DEBIAN_MIRROR (default: the one apt on this machine uses), FEDTEXT_BASE_ROUTE
# (debootstrap or pull: take only that route; the tests use it), FEDTEXT_NO_APT=1 (never install).
set -euo pipefail

force=0
if [ "${1:-}" = "--force" ]; then force=1; shift; fi
IMAGE="${1:-${BASE_IMAGE:-debian:bookworm-slim}}"
SUITE=bookworm
UPSTREAM=debian:bookworm-slim
ROUTE="${FEDTEXT_BASE_ROUTE:-any}"
LOG_DIR="${TMPDIR:-/tmp}"

if [ "$force" = 0 ] && docker image inspect "$IMAGE" >/dev/null 2>&1; then
  echo "base image $IMAGE already present; reusing it"
  exit 0
fi

mirror_from_apt() {
  # First `URIs:` (deb822) or `deb URL` (one-line) entry that points at a Debian archive (not -security).
  local f
  for f in /etc/apt/sources.list.d/*.sources /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
    [ -r "$f" ] || continue
    awk '/^URIs:/ {print $2} /^deb / {for (i = 2; i <= NF; i++) if ($i ~ /^https?:/) {print $i; break}}' "$f"
  done | grep -v -- '-security' | grep -E '/debian/?$' | head -n 1
}
MIRROR="${DEBIAN_MIRROR:-$(mirror_from_apt || true)}"
MIRROR="${MIRROR:-http://deb.debian.org/debian}"

# Route 1's prerequisite. Returns 0 when debootstrap can run here (installing it if need be).
ensure_debootstrap() {
  [ "$(id -u)" = 0 ] || return 1
  command -v debootstrap >/dev/null && return 0
  [ "${FEDTEXT_NO_APT:-0}" != 1 ] && command -v apt-get >/dev/null || return 1
  local log="$LOG_DIR/fedtext-apt-debootstrap.log"
  echo "debootstrap is not installed; installing it with apt-get (log: $log)"
  export DEBIAN_FRONTEND=noninteractive
  # Without package lists (a fresh container, a cleaned image) the first install fails: update, retry.
  if ! apt-get install -y --no-install-recommends debootstrap >"$log" 2>&1; then
    timeout 300 apt-get update >>"$log" 2>&1 || true
    if ! apt-get install -y --no-install-recommends debootstrap >>"$log" 2>&1; then
      echo "apt-get could not install debootstrap:" >&2
      tail -n 5 "$log" | sed 's/^/    /' >&2
      return 1
    fi
  fi
  command -v debootstrap >/dev/null
}

# Route 2. Returns 0 when the upstream image was pulled (and tagged IMAGE).
pull_upstream() {
  local log="$LOG_DIR/fedtext-docker-pull.log"
  echo "trying: docker pull $UPSTREAM"
  if timeout 600 docker pull "$UPSTREAM" >"$log" 2>&1; then
    [ "$IMAGE" = "$UPSTREAM" ] || docker tag "$UPSTREAM" "$IMAGE"
    echo "pulled $UPSTREAM$([ "$IMAGE" = "$UPSTREAM" ] || echo " as $IMAGE")"
    return 0
  fi
  echo "    no registry: $(tail -n 1 "$log")"
  return 1
}

# Route 3: one instruction, the one that fits this machine.
give_up() {
  echo >&2
  if [ "$(id -u)" != 0 ]; then
    echo "The base image $IMAGE is missing, no registry can be reached, and making it needs root once. Run:" >&2
    echo "    sudo $0 $IMAGE" >&2
  elif ! command -v apt-get >/dev/null; then
    echo "The base image $IMAGE is missing, no registry can be reached, and this is not a Debian-like system." >&2
    echo "Install debootstrap with this system's package manager (for instance: dnf install debootstrap), then run make again." >&2
  else
    echo "The base image $IMAGE is missing: neither the Debian mirror ($MIRROR) nor a registry can be reached." >&2
    tag=""
    [ "$IMAGE" = "$UPSTREAM" ] || tag=" && docker tag $UPSTREAM $IMAGE"
    echo "On a machine with Docker Hub access run \`docker save $UPSTREAM -o base.tar\`, copy base.tar here, and run: docker load -i base.tar$tag" >&2
  fi
  exit 1
}

if [ "$ROUTE" != pull ] && ensure_debootstrap; then
  :
elif [ "$ROUTE" != debootstrap ] && pull_upstream; then
  exit 0
else
  give_up
fi

work="$(mktemp -d "${TMPDIR:-/tmp}/fedtext-rootfs.XXXXXX")"
trap 'rm -rf "$work"' EXIT
rootfs="$work/rootfs"
start=$(date +%s)
echo "debootstrap --variant=minbase $SUITE from $MIRROR"
if ! debootstrap --variant=minbase "$SUITE" "$rootfs" "$MIRROR" >"$work/debootstrap.log" 2>&1; then
  echo "debootstrap failed:" >&2
  tail -n 10 "$work/debootstrap.log" | sed 's/^/    /' >&2
  if [ "$ROUTE" != debootstrap ] && pull_upstream; then exit 0; fi
  give_up
fi

# Trim like debian:*-slim: no docs, man pages or locales now or in later apt installs; no apt caches.
cat >"$rootfs/etc/dpkg/dpkg.cfg.d/docker" <<'CFG'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/lintian/*
path-exclude /usr/share/linda/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
CFG
cat >"$rootfs/etc/apt/apt.conf.d/docker-clean" <<'CFG'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
CFG
echo 'Acquire::Languages "none";' >"$rootfs/etc/apt/apt.conf.d/docker-no-languages"
find "$rootfs/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete 2>/dev/null || true
find "$rootfs/usr/share/doc" -mindepth 1 -type d -empty -delete 2>/dev/null || true
rm -rf "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/* "$rootfs"/usr/share/groff/* \
  "$rootfs"/usr/share/lintian/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/cache/apt/archives/*.deb \
  "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/log/*.log "$rootfs"/var/cache/debconf/*-old \
  "$rootfs"/tmp/* "$rootfs"/root/.bash_history
find "$rootfs/usr/share/locale" -mindepth 1 -maxdepth 1 -not -name locale.alias -exec rm -rf {} +
# Point apt inside the image at the same archive (deb822, like the official image), and reset identity files.
rm -f "$rootfs/etc/apt/sources.list"
cat >"$rootfs/etc/apt/sources.list.d/debian.sources" <<SRC
Types: deb
URIs: $MIRROR
Suites: $SUITE $SUITE-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: ${DEBIAN_SECURITY_MIRROR:-${MIRROR%/}-security}
Suites: $SUITE-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
: >"$rootfs/etc/machine-id"
echo localhost >"$rootfs/etc/hostname"

tar --numeric-owner --xattrs -C "$rootfs" -c . |
  docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["bash"]' \
    --message "debootstrap --variant=minbase $SUITE $MIRROR" \
    - "$IMAGE" >/dev/null
end=$(date +%s)
size=$(docker image inspect -f '{{.Size}}' "$IMAGE")
echo "built base image $IMAGE in $((end - start)) s, $((size / 1000000)) MB"

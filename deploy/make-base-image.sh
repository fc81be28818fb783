#!/usr/bin/env bash
# Builds the base image the Dockerfile expects (default `debian:bookworm-slim`) without pulling from a
# registry: a minbase Debian bookworm rootfs from debootstrap, trimmed the way the official slim image is,
# then `docker import`ed. Does nothing when an image with that name already exists (pass --force to rebuild).
#
#   deploy/make-base-image.sh [--force] [IMAGE]      (needs root for debootstrap, and a Docker engine)
#
# The mirror defaults to the one apt on this machine already uses; override with DEBIAN_MIRROR.
set -euo pipefail

force=0
if [ "${1:-}" = "--force" ]; then force=1; shift; fi
IMAGE="${1:-${BASE_IMAGE:-debian:bookworm-slim}}"
SUITE=bookworm

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

command -v debootstrap >/dev/null || { echo "debootstrap is not installed (apt-get install debootstrap)" >&2; exit 1; }
if [ "$(id -u)" != 0 ]; then
  echo "debootstrap needs root; run: sudo $0 $*" >&2
  exit 1
fi

work="$(mktemp -d "${TMPDIR:-/tmp}/fedtext-rootfs.XXXXXX")"
trap 'rm -rf "$work"' EXIT
rootfs="$work/rootfs"
start=$(date +%s)
echo "debootstrap --variant=minbase $SUITE from $MIRROR"
debootstrap --variant=minbase "$SUITE" "$rootfs" "$MIRROR" >"$work/debootstrap.log" 2>&1 || {
  tail -n 30 "$work/debootstrap.log" >&2
  exit 1
}

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

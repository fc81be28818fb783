#!/usr/bin/env bash
# Builds the runtime image from the binaries `make build` left in target/release, without any registry:
#   1. the base image (deploy/make-base-image.sh; reused when present),
#   2. a build context with the binaries and the libraries they load (deploy/stage.sh),
#   3. docker build --target runtime-prebuilt.
# Prints how long each step took and the image size.
#
#   deploy/build-images.sh            environment: FEDTEXT_IMAGE (fedtext:latest), BASE_IMAGE
#                                     (debian:bookworm-slim), BIN_DIR (target/release)
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/.." && pwd)"
image="${FEDTEXT_IMAGE:-fedtext:latest}"
base="${BASE_IMAGE:-debian:bookworm-slim}"
bin_dir="${BIN_DIR:-$root/target/release}"
context="$root/target/deploy/context"

now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

t0="$(now)"
"$here/make-base-image.sh" "$base"
t_base="$(elapsed "$t0")"

t1="$(now)"
"$here/stage.sh" "$bin_dir" "$context" >/dev/null
t_stage="$(elapsed "$t1")"

t2="$(now)"
log="$root/target/deploy/docker-build.log"
if ! docker build -f "$here/Dockerfile" --target runtime-prebuilt --build-arg BASE_IMAGE="$base" \
  -t "$image" "$context" >"$log" 2>&1; then
  tail -n 40 "$log" >&2
  echo "docker build failed; full log: $log" >&2
  exit 1
fi
t_build="$(elapsed "$t2")"
# The image this one replaced is left untagged; drop it (only untagged images with our label).
docker image prune -f --filter "label=org.opencontainers.image.title=fedtext" >/dev/null 2>&1 || true

size="$(docker image inspect -f '{{.Size}}' "$image")"
base_size="$(docker image inspect -f '{{.Size}}' "$base")"
libs="$(du -sm "$context/lib" | cut -f1)"
bins="$(du -sm "$context/bin" | cut -f1)"
echo "image $image: $((size / 1000000)) MB (base $((base_size / 1000000)) MB, libraries ${libs} MiB, binaries ${bins} MiB)"
echo "times: base ${t_base} s, stage ${t_stage} s, docker build ${t_build} s, total $(elapsed "$t0") s"

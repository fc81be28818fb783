#!/usr/bin/env bash
# Assembles a Docker build context for the runtime image from binaries that are already built:
#
#   OUT/bin/fl-coordinator, OUT/bin/fl-client   the binaries, stripped
#   OUT/lib/*.so*                                 just the shared libraries they load that are not part of the
#                                                 base image (libtorch_cpu, libc10, libgomp, ...), found with
#                                                 ldd, stripped
#   OUT/deploy/entrypoint.sh, healthcheck.sh      the container scripts, at the paths the Dockerfile copies from
#
#   deploy/stage.sh [BIN_DIR [OUT]]     defaults: target/release, target/deploy/context
#
# The Dockerfile's builder stage runs the same script, so both build paths ship the same files.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/.." && pwd)"
bin_dir="${1:-$root/target/release}"
out="${2:-$root/target/deploy/context}"
binaries=(fl-coordinator fl-client fl-health)

for b in "${binaries[@]}"; do
  [ -x "$bin_dir/$b" ] || { echo "stage.sh: $bin_dir/$b is missing; run \`make build\` first" >&2; exit 1; }
done

rm -rf "$out"
mkdir -p "$out/bin" "$out/lib" "$out/deploy"

# Libraries the base image provides (glibc, libstdc++, libgcc_s) live in the system directories; everything
# else that ldd resolves (libtorch from the pip wheel, with its bundled libgomp, and the CUDA runtime stubs
# libtorch_cpu.so names as NEEDED) is copied. The Dockerfile re-runs ldd inside the image and fails the
# build if anything is still missing there.
is_system_lib() {
  case "$1" in
    /lib/* | /lib64/* | /usr/lib/* | /usr/lib64/*) return 0 ;;
    *) return 1 ;;
  esac
}

declare -A copied=()
for b in "${binaries[@]}"; do
  cp "$bin_dir/$b" "$out/bin/$b"
  if command -v strip >/dev/null; then strip --strip-unneeded "$out/bin/$b"; fi
  ldd_out="$(ldd "$bin_dir/$b")"
  if grep -q 'not found' <<<"$ldd_out"; then
    echo "stage.sh: $b has unresolved libraries on this host:" >&2
    grep 'not found' <<<"$ldd_out" >&2
    exit 1
  fi
  # Lines look like: "libtorch_cpu.so => /path/to/libtorch_cpu.so (0x...)".
  while read -r soname arrow path _; do
    [ "$arrow" = "=>" ] && [ -n "$path" ] && [ "${path#/}" != "$path" ] || continue
    is_system_lib "$path" && continue
    [ -n "${copied[$soname]:-}" ] && continue
    # Copied under the name the loader asks for, and stripped: the pip wheel's libtorch_cpu.so carries
    # a symbol table (strip takes it from 438 MB to 349 MB); the dynamic symbols stay.
    cp "$(readlink -f "$path")" "$out/lib/$soname"
    chmod 0755 "$out/lib/$soname"
    if command -v strip >/dev/null; then strip --strip-unneeded "$out/lib/$soname"; fi
    copied[$soname]="$path"
  done <<<"$ldd_out"
done

cp "$here/entrypoint.sh" "$here/healthcheck.sh" "$out/deploy/"
chmod 0755 "$out/bin/"* "$out/deploy/"*.sh

echo "staged $out:"
(cd "$out" && du -ah bin lib | sort -k2)

#!/usr/bin/env bash
# CPU time of one health probe against a running coordinator: `fl-health` (no libtorch) against
# `fl-coordinator health` (links libtorch). Each probe runs N times; prints the median user+sys
# CPU milliseconds per probe, measured with getrusage on the finished child.
# Usage: bench/health-probe.sh [N]
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/federation-lib.sh
. scripts/federation-lib.sh
N=${1:-20}
DIR=target/bench/health
rm -rf "$DIR"; mkdir -p "$DIR"
trap fed_stop EXIT
fed_start_coordinator "$DIR/coord" "$DIR/coordinator.log" --labels a,b --rounds 1
python3 - "$N" "$FED_URL" "$DIR/coord/ca.pem" "$FL_BIN" <<'PY'
import os, resource, statistics, subprocess, sys
n, url, ca, bin_dir = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
def cpu_ms(cmd):
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return 1000 * ((after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime))
probes = {
    "fl-health": [f"{bin_dir}/fl-health", "--coordinator", url, "--ca", ca],
    "fl-coordinator health": [f"{bin_dir}/fl-coordinator", "health", "--coordinator", url, "--ca", ca],
}
results = {name: sorted(cpu_ms(cmd) for _ in range(n)) for name, cmd in probes.items()}
for name, ms in results.items():
    print(f"{name:<22} median {statistics.median(ms):7.1f} ms CPU per probe (min {ms[0]:.1f}, max {ms[-1]:.1f}, n={n})")
ratio = statistics.median(results["fl-coordinator health"]) / statistics.median(results["fl-health"])
print(f"ratio: fl-coordinator health costs {ratio:.1f}x the CPU of fl-health")
PY

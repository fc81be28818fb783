#!/usr/bin/env bash
# Same-machine comparison with Flower 1.42 + PyTorch: generates the data once, runs the Flower
# baseline (bench/flower/flower_fasttext.py: server + 4 client processes over loopback gRPC),
# then our federation (bench/federation.sh) on the same data and flags, and prints a table.
# Usage: bench/flower/compare.sh [SIGNAL=0.08] [ROUNDS=20] [TARGET=0.42]   (see RESULTS.md for why 0.08)
# Environment: ROWS (6700), CLIENTS (4), FLOWER_OPTIMIZER (adam-fused; or adam, sparse-adam),
#   WORK (target/flower-compare), MAX_LOAD (wait before each run until the 1-minute load average
#   is below it; default: no wait), LOAD_WAIT_S (longest such wait, 600), NICE (run both systems
#   at this niceness, e.g. -10 as root, so that other jobs on the machine disturb them less; the
#   same for both), SKIP_FLOWER / SKIP_OURS=1.
set -euo pipefail
cd "$(dirname "$0")/../.."
SIGNAL=${1:-0.08}
ROUNDS=${2:-20}
TARGET=${3:-0.42}
ROWS=${ROWS:-6700}
CLIENTS=${CLIENTS:-4}
OPT=${FLOWER_OPTIMIZER:-adam-fused}
WORK=${WORK:-target/flower-compare}
VENV=${FL_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/fedtext}/flower-venv
BIN=target/release
[ -x $BIN/fl-client ] && [ -x $BIN/fl-coordinator ] || { echo "build the release binaries first" >&2; exit 1; }
bench/flower/setup.sh >&2
rm -rf "$WORK"; mkdir -p "$WORK"

load() { cut -d' ' -f1-3 /proc/loadavg; }
PRIO=(); [ -n "${NICE:-}" ] && PRIO=(nice -n "$NICE")
wait_load() {
  [ -n "${MAX_LOAD:-}" ] || return 0
  local waited=0
  while awk -v m="$MAX_LOAD" '{exit !($1 >= m)}' /proc/loadavg && [ $waited -lt "${LOAD_WAIT_S:-600}" ]; do
    sleep 5; waited=$((waited + 5))
  done
  [ $waited -gt 0 ] && echo "waited ${waited}s for the load to drop below $MAX_LOAD" >&2 || true
}

# The same arguments federation.sh passes to the generator (seed 11), so both runs see identical files.
$BIN/fl-client gen-data --out "$WORK/data" --rows "$ROWS" --shards "$CLIENTS" --signal "$SIGNAL" --seed 11 >/dev/null
echo "signal $SIGNAL, rows $ROWS, clients $CLIENTS, rounds $ROUNDS, target $TARGET, flower optimizer $OPT, nice ${NICE:-0}"
ident() { echo "$(sha256sum "$1" | cut -c1-12) $(date -r "$1" +%H:%M:%S)"; }
echo "binaries: fl-coordinator $(ident $BIN/fl-coordinator), fl-client $(ident $BIN/fl-client); HEAD $(git rev-parse --short HEAD 2>/dev/null || echo '?')" | tee "$WORK/binaries"

if [ -z "${SKIP_FLOWER:-}" ]; then
  wait_load
  lb=$(load); echo "== flower (load before: $lb)"
  "${PRIO[@]}" python3 bench/flower/cputime.py "$WORK/flower.cpu" \
    "$VENV/bin/python" bench/flower/flower_fasttext.py run --t0 "$(date +%s.%N)" --data "$WORK/data" \
    --clients "$CLIENTS" --rounds "$ROUNDS" --out "$WORK/flower" --optimizer "$OPT" | tee "$WORK/flower.out"
  la=$(load); echo "== flower done (load after: $la)"
  echo "$lb / $la" >"$WORK/flower.load"
fi
if [ -z "${SKIP_OURS:-}" ]; then
  wait_load
  lb=$(load); echo "== ours (load before: $lb)"
  BENCH_DIR="$WORK/ours" SIGNAL="$SIGNAL" ROWS="$ROWS" MODEL=fasttext LR=0.01 EPOCHS=1 \
    "${PRIO[@]}" python3 bench/flower/cputime.py "$WORK/ours.cpu" bench/federation.sh "$CLIENTS" "$ROUNDS" "$TARGET" | tee "$WORK/ours.out"
  la=$(load); echo "== ours done (load after: $la)"
  echo "$lb / $la" >"$WORK/ours.load"
  # federation.sh's run folder: BENCH_DIR/c4-r20 in older versions, BENCH_DIR/fasttext-c4-r20 now.
  OURS=$(ls -d "$WORK"/ours/*c"$CLIENTS"-r"$ROUNDS" | head -n 1)
  echo "$OURS" >"$WORK/ours.dir"
  # Our launch: federation.sh takes its start time just before it spawns the coordinator, whose
  # log file the shell creates at that moment; its birth time is the launch.
  date -d "$(stat -c %w "$OURS/logs/coordinator.log")" +%s.%N >"$WORK/ours.t0"
  for f in "$WORK"/data/*.csv; do cmp -s "$f" "$OURS/data/$(basename "$f")" || { echo "data differ: $f" >&2; exit 1; }; done
  echo "data: federation.sh generated files identical to $WORK/data"
fi

now="binaries: fl-coordinator $(ident $BIN/fl-coordinator), fl-client $(ident $BIN/fl-client)"
case "$(cat "$WORK/binaries")" in "$now"*) ;; *) echo "WARNING: the binaries changed during the run: $now" | tee -a "$WORK/binaries" >&2;; esac
python3 - "$WORK" "$CLIENTS" "$ROUNDS" "$TARGET" <<'PY'
import json, os, re, sys
from datetime import datetime
work, clients, rounds, target = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
rows = {}
f = f"{work}/flower/summary.json"
if os.path.exists(f):
    s = json.load(open(f))
    rows["Flower"] = dict(curve=[(r["round"], r["accuracy"], r["elapsed_s"]) for r in s["rounds"]],
                          wall=s["wall_s"], round_s=[r["round_s"] for r in s["rounds"]])
d = open(f"{work}/ours.dir").read().strip() if os.path.exists(f"{work}/ours.dir") else ""
if d and os.path.exists(f"{d}/coord/metrics.jsonl"):
    t0 = float(open(f"{work}/ours.t0").read())
    m = {x["round"]: x for x in map(json.loads, open(f"{d}/coord/metrics.jsonl"))}
    done = {}
    for line in open(f"{d}/logs/coordinator.log"):
        line = re.sub(r"\x1b\[[0-9;]*m", "", line)
        g = re.match(r"(\S+Z)\s.*round completed round=(\d+)", line)
        if g:
            done[int(g.group(2))] = datetime.fromisoformat(g.group(1).replace("Z", "+00:00")).timestamp() - t0
    wall = float(re.search(r"wall time, launch to end: ([0-9.]+) s", open(f"{work}/ours.out").read()).group(1))
    rows["ours"] = dict(curve=[(r, m[r]["accuracy"], done[r]) for r in sorted(m)], wall=wall,
                        round_s=[m[r]["round_s"] for r in sorted(m)])
out = []
for name, r in rows.items():
    c = r["curve"]
    first = next(((n, a, t) for n, a, t in c if a >= target), None)
    last = c[-1] if c else (0, float("nan"), float("nan"))
    steady = (c[-1][2] - c[0][2]) / (len(c) - 1) if len(c) > 1 else float("nan")
    r.update(first=first, last=last, per_round=sum(r["round_s"]) / max(1, len(r["round_s"])), steady=steady)
    out.append(f"{name} accuracy per round: " + " ".join(f"{a:.3f}" for _, a, _ in c))
    out.append(f"{name} seconds from launch per round: " + " ".join(f"{t:.1f}" for _, _, t in c))
for name, f in (("Flower", "flower.cpu"), ("ours", "ours.cpu")):
    if name in rows:
        u, s_ = map(float, open(f"{work}/{f}").read().split()) if os.path.exists(f"{work}/{f}") else (float("nan"),) * 2
        rows[name]["cpu"] = u + s_
fmt = "{:<8} {:>14} {:>6} {:>9} {:>13} {:>9} {:>11} {:>11} {:>8}"
out.append("")
out.append(fmt.format("system", f"s to >={target}", "round", f"acc r{rounds}", f"s to r{rounds}",
                      "wall s", "s/round", "s/round 2+", "CPU s"))
for name, r in rows.items():
    f_ = r["first"]
    out.append(fmt.format(name, f"{f_[2]:.1f}" if f_ else "not reached", str(f_[0]) if f_ else "-",
                          f"{r['last'][1]:.3f}" if r["last"][0] == rounds else f"(r{r['last'][0]})",
                          f"{r['last'][2]:.1f}", f"{r['wall']:.1f}", f"{r['per_round']:.2f}", f"{r['steady']:.2f}", f"{r['cpu']:.1f}"))
if len(rows) == 2:
    fl, us = rows["Flower"], rows["ours"]
    ratio = lambda a, b: f"{a / b:.2f}" if b else "n/a"
    out.append(fmt.format("ours/Fl", ratio(us["first"][2], fl["first"][2]) if us["first"] and fl["first"] else "n/a",
                          "", "", ratio(us["last"][2], fl["last"][2]), ratio(us["wall"], fl["wall"]),
                          ratio(us["per_round"], fl["per_round"]), ratio(us["steady"], fl["steady"]), ratio(us["cpu"], fl["cpu"])))
out.append("")
out.append("s to >=T: launch to the first round whose centralized test accuracy is >= T; s to rN: launch to "
           "round N's result; wall s: launch to server exit; s/round: mean round time; s/round 2+: "
           "(t(rN) - t(r1)) / (N - 1); CPU s: user + system time of all the run's processes "
           "(for ours it includes data generation by federation.sh, ~0.1 s)")
out.append(open(f"{work}/binaries").read().strip())
for name, f in (("Flower", "flower.load"), ("ours", "ours.load")):
    if os.path.exists(f"{work}/{f}"):
        out.append(f"{name}: load average before / after: " + open(f"{work}/{f}").read().strip())
print("\n".join(out))
open(f"{work}/table.txt", "w").write("\n".join(out) + "\n")
PY

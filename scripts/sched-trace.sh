#!/usr/bin/env bash
# Who holds a core while the gateway's threads wait for one: the gateway with
# everything on (two threads, SQLite usage), the mock provider and the load
# generator share the two cores, unpinned, as in the load benchmark's search;
# the small chat completion at RATE req/s (default 6000) for SECONDS (default
# 4) under `perf sched record`, then every scheduling delay over THRESHOLD_MS
# (default 0.2) of a proxy thread, the mock or the load generator is charged
# to what ran on that CPU meanwhile (scripts/lib/sched_blame.py).
#
#   ./scripts/sched-trace.sh [RATE [SECONDS [THRESHOLD_MS]]]
#
# This is how the usage writer's slices were found to delay the proxy threads
# (BENCHMARKS.md, "2026-12-07 21:30"). AI4FREE_BIN traces another build of the
# gateway (e.g. a copy of an earlier target/release/ai4free) against the same
# mock. AI4FREE_PINNED=1 traces the load benchmark's pinned topology instead:
# the gateway with one thread on core 1 (its usage writer with it), the mock
# and the load generator on core 0. Results: bench-results/sched-trace.md.
# Needs root (perf sched).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib/build-deps.sh
. scripts/lib/bench-env.sh
command -v perf >/dev/null 2>&1 || apt_install "perf sched traces" linux-perf
rate=${1:-6000}
secs=${2:-4}
threshold=${3:-0.2}
threads=2
topology="unpinned, 2 proxy threads"
on_proxy_core=()
on_load_core=()
if [ -n "${AI4FREE_PINNED:-}" ]; then
  [ "$(nproc)" -ge 2 ] || { echo "AI4FREE_PINNED needs two cores" >&2; exit 1; }
  threads=1
  topology="pinned: the gateway (1 thread) on core 1, mock and load on core 0"
  on_proxy_core=(taskset -c 1)
  on_load_core=(taskset -c 0)
fi
cargo build --release --locked --bin ai4free --example mock_provider
bin=target/release
gateway_bin=${AI4FREE_BIN:-$bin/ai4free}
# One build, which also names the probe's executable (cargo's progress stays on stderr).
probe=$(cargo bench --locked --bench probe --no-run --message-format=json |
  python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "probe" and m.get("executable"):
        print(m["executable"])')
out=bench-results
work=$(mktemp -d)
mkdir -p "$out"
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

mock=$(free_port)
"${on_load_core[@]}" "$bin/examples/mock_provider" --listen "127.0.0.1:$mock" >/dev/null 2>&1 &
pids+=($!)
mock_pid=$!
port=$(free_port)
bench_gateway_yaml "$port" "$work/usage.db" "$threads" "$mock" >"$work/gateway.yaml"
key=$("$gateway_bin" keys create --tier bench --config "$work/gateway.yaml" 2>/dev/null)
RUST_LOG=error "${on_proxy_core[@]}" "$gateway_bin" serve --config "$work/gateway.yaml" >"$work/gateway.log" 2>&1 &
pids+=($!)
gateway_pid=$!
wait_port "$mock"
wait_port "$port"

# The probe starts once perf is recording; perf stops shortly after it ends.
# `exec` keeps the subshell's pid, so $! is the probe's (the load generator).
(sleep 0.5; exec "${on_load_core[@]}" "$probe" "$rate" "$secs" 1 "gateway=127.0.0.1:$port,$key") >"$work/probe.txt" &
probe_pid=$!
perf sched record -a -o "$work/sched.data" -- sleep "$(python3 -c "print($secs + 2.5)")" \
  >/dev/null 2>&1
wait "$probe_pid"
perf sched timehist -i "$work/sched.data" 2>/dev/null >"$work/timehist.txt"
{
  echo "Run: $(date -u '+%Y-%m-%d %H:%M UTC'); $gateway_bin; $(nproc) CPUs; $topology; $rate req/s for $secs s"
  echo
  echo '```'
  cat "$work/probe.txt"
  echo '```'
  echo
  python3 scripts/lib/sched_blame.py "$work/timehist.txt" "$gateway_pid" "$mock_pid" "$probe_pid" "$threshold"
} | tee "$out/sched-trace.md"

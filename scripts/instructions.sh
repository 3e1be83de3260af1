#!/usr/bin/env bash
# User-space instructions per request, counted by callgrind: bare Pingora, the
# gateway with everything on, and the gateway with one capability off at a time.
#
# The load benchmark's timings move with this shared VM (the closed-loop ratio
# moved 0.63-0.81x within one session); an instruction count barely does (two
# runs agree within ~2%; one function's count in the kept files not at all), so
# this is what to compare a request-path change against. It counts user space only (not the kernel's TCP work, which is the
# same for both proxies) and every thread of the process, the usage writer's
# SQLite inserts included. Takes ~5 minutes. Results: bench-results/instructions.md;
# the callgrind files stay in bench-results/callgrind/ for callgrind_annotate.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib/build-deps.sh
. scripts/lib/bench-env.sh
missing=()
command -v valgrind >/dev/null 2>&1 || missing+=(valgrind)
command -v wrk >/dev/null 2>&1 || missing+=(wrk)
if [ ${#missing[@]} -gt 0 ]; then
  apt_install "callgrind counts, wrk loads" "${missing[@]}"
fi
cargo build --release --locked --bin ai4free --example mock_provider --example bare_proxy
bin=target/release
out=bench-results
work=$(mktemp -d)
mkdir -p "$out/callgrind"
mock_pid=""
cleanup() {
  [ -n "$mock_pid" ] && kill "$mock_pid" 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

mock=$(free_port)
"$bin/examples/mock_provider" --listen "127.0.0.1:$mock" >/dev/null 2>&1 &
mock_pid=$!
wait_port "$mock"

# The load benchmark's small chat completion, POSTed by wrk with the key in $KEY.
cat >"$work/post.lua" <<'EOF'
wrk.method = "POST"
wrk.body = '{"model":"gpt-4o-mini","messages":[{"role":"system","content":"You are terse."},{"role":"user","content":"Say hello to the benchmark."}],"max_tokens":16,"stream":false}'
wrk.headers["Content-Type"] = "application/json"
local key = os.getenv("KEY")
if key and key ~= "" then wrk.headers["Authorization"] = "Bearer " .. key end
EOF

# measure NAME PORT: 3 s of warm-up, then the counters are zeroed, 10 s of
# load (4 connections), and the counters dumped; prints "requests instructions".
measure() {
  local name=$1 port=$2 pid=$3
  wrk -t1 -c4 -d3s -s "$work/post.lua" "http://127.0.0.1:$port/v1/chat/completions" >/dev/null
  callgrind_control --zero "$pid" >/dev/null 2>&1
  local report
  report=$(wrk -t1 -c4 -d10s -s "$work/post.lua" "http://127.0.0.1:$port/v1/chat/completions")
  if grep -q "Non-2xx" <<<"$report"; then
    echo "$name answered non-2xx responses:" >&2
    echo "$report" >&2
    exit 1
  fi
  callgrind_control --dump "$pid" >/dev/null 2>&1
  sleep 1
  local n ir file
  n=$(awk '/requests in/ {print $1}' <<<"$report")
  file=$(ls -t "$out/callgrind/$name."* | head -1)
  ir=$(awk '/^summary:/ {print $2}' "$file")
  echo "$n $ir"
}

# run NAME PORT CMD...: starts CMD under callgrind, measures it, stops it. It
# runs in a command substitution (a subshell), so it stops its own process
# rather than leaving it to the EXIT trap.
run() {
  local name=$1 port=$2
  shift 2
  rm -f "$out/callgrind/$name."*
  valgrind --tool=callgrind --compress-strings=no --compress-pos=no \
    --callgrind-out-file="$out/callgrind/$name.%p" "$@" >"$work/$name.log" 2>&1 &
  local pid=$!
  wait_port "$port"
  measure "$name" "$port" "$pid"
  kill "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}

declare -A result
port=$(free_port)
export KEY=""
result[bare]=$(run bare "$port" "$bin/examples/bare_proxy" --listen "127.0.0.1:$port" \
  --upstream "127.0.0.1:$mock" --threads 1)
echo "bare: ${result[bare]}"

# Arguments pick the variants (default: all); bare, the denominator, always runs.
variants=("$@")
[ ${#variants[@]} -eq 0 ] && variants=(gateway auth limits usage counting metrics)
for v in "${variants[@]}"; do
  port=$(free_port)
  ablate=""
  [ "$v" != gateway ] && ablate=$v
  bench_gateway_yaml "$port" "$work/$v.db" 1 "$mock" "$ablate" >"$work/$v.yaml"
  KEY=$("$bin/ai4free" keys create --tier bench --config "$work/$v.yaml" 2>/dev/null)
  export KEY
  name=gateway
  [ -n "$ablate" ] && name="gateway-no-$v"
  result[$v]=$(RUST_LOG=error run "$name" "$port" "$bin/ai4free" serve --config "$work/$v.yaml")
  echo "$name: ${result[$v]}"
done

per() { awk '{printf "%.0f", $2 / $1}' <<<"$1"; }
bare=$(per "${result[bare]}")
full=$(per "${result[gateway]}")
{
  echo "Run: $(date -u '+%Y-%m-%d %H:%M UTC'); callgrind, user-space instructions of the whole process per request (wrk -t1 -c4, 10 s after 3 s of warm-up; each proxy with one thread)."
  echo
  echo "| system | requests | instructions per request | ratio to bare | the capability's own cost |"
  echo "|---|---|---|---|---|"
  echo "| bare | ${result[bare]%% *} | $bare | 1.00 | — |"
  for v in "${variants[@]}"; do
    p=$(per "${result[$v]}")
    ratio=$(awk -v a="$p" -v b="$bare" 'BEGIN{printf "%.2f", a/b}')
    if [ "$v" = gateway ]; then
      echo "| gateway | ${result[$v]%% *} | $p | $ratio | — |"
    else
      echo "| gateway −$v | ${result[$v]%% *} | $p | $ratio | $((full - p)) |"
    fi
  done
} >"$out/instructions.md"
cat "$out/instructions.md"

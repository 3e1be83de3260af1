#!/usr/bin/env bash
# Reproduces BENCHMARKS.md: builds the release binaries (gateway, mock provider,
# bare Pingora proxy), then runs the load benchmark, the micro-benchmarks and the
# instruction counts per request (scripts/instructions.sh).
# Takes ~15-25 minutes on 2 cores. Results: bench-results/latest.md and criterion's
# target/criterion/.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib/build-deps.sh
cargo build --release --locked --bin ai4free --example mock_provider --example bare_proxy
# The peer gateway measured in the same run: LiteLLM's proxy from PyPI.
if [ "${AI4FREE_BENCH_NO_LITELLM:-}" = "" ]; then
  if [ ! -x .venv-litellm/bin/litellm ]; then
    echo "==> installing LiteLLM's proxy into .venv-litellm (peer comparison)"
    python3 -m venv .venv-litellm
    .venv-litellm/bin/pip install -q --disable-pip-version-check 'litellm[proxy]'
  fi
  export AI4FREE_BENCH_LITELLM="$PWD/.venv-litellm/bin/litellm"
fi
cargo bench --locked --bench proxy_load
if [ "${1:-}" != "--load-only" ]; then
  cargo bench --locked --bench hot_paths -- --warm-up-time 1 --measurement-time 3
  cargo bench --locked --bench tokens -- --warm-up-time 1 --measurement-time 3
  ./scripts/instructions.sh
fi

#!/usr/bin/env bash
# The whole test suite, from a fresh Debian/Ubuntu machine with Rust installed:
# installs what the build needs (cmake, a C compiler) and the servers the tests
# start (redis-server, PostgreSQL), then runs formatting, lints, unit tests and the
# end-to-end tests (real gateway nodes, mock provider, SQLite, PostgreSQL, Redis).
set -euo pipefail
cd "$(dirname "$0")/.."

. scripts/lib/build-deps.sh
. scripts/lib/test-services.sh
rustup component add rustfmt clippy >/dev/null 2>&1 || true

# The OpenAI SDK check drives the gateway with the official Python client.
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c "import openai" 2>/dev/null; then
  echo "==> installing the openai Python SDK into .venv (for the SDK compatibility test)"
  if ! python3 -m venv .venv >/dev/null 2>&1; then
    apt_install "python3 -m venv needs it" python3-venv
    python3 -m venv .venv
  fi
  .venv/bin/pip install -q --disable-pip-version-check openai
fi
export AI4FREE_TEST_PYTHON="$PWD/.venv/bin/python"

echo "==> cargo fmt --check"
cargo fmt --all -- --check

echo "==> cargo clippy --workspace --all-targets -- -D warnings"
cargo clippy --workspace --all-targets --locked -- -D warnings

echo "==> cargo test"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
cargo test --locked --workspace --lib --bins --tests --examples 2>&1 | tee "$log"
# One closing line over every test binary (cargo prints one per binary).
passed=$(grep -oE '[0-9]+ passed' "$log" | awk '{s+=$1} END {print s+0}')
failed=$(grep -oE '[0-9]+ failed' "$log" | awk '{s+=$1} END {print s+0}')
echo
echo "${passed} passed, ${failed} failed"
[ "$failed" -eq 0 ]

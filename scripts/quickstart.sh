#!/usr/bin/env bash
# From a fresh clone to a working request: builds ai4free, starts the bundled mock
# provider on 127.0.0.1:9090, creates an API key, prints ready-to-paste client
# snippets, and runs the gateway on 127.0.0.1:8080 (embedded SQLite in data/).
# Ctrl-C stops both. Point conf/ai4free.yaml at a real provider to go live.
set -euo pipefail
cd "$(dirname "$0")/.."

. scripts/lib/build-deps.sh

echo "==> building (first build takes a few minutes)"
cargo build --locked --bin ai4free --example mock_provider

CONFIG="${AI4FREE_CONFIG:-conf/ai4free.yaml}"
TARGET="${CARGO_TARGET_DIR:-target}"
BIN="$TARGET/debug/ai4free"
"$BIN" check-config --config "$CONFIG"

"$TARGET"/debug/examples/mock_provider --listen 127.0.0.1:9090 --chunk-delay-ms 30 &
MOCK_PID=$!
trap 'kill $MOCK_PID 2>/dev/null || true' EXIT INT TERM

KEY=$("$BIN" keys create --config "$CONFIG" --tier pro --name quickstart --owner "$(whoami)")

cat <<MSG

==> ai4free is starting on http://127.0.0.1:8080 in front of the mock provider.
    Your API key (shown once): $KEY

    curl:
      curl http://127.0.0.1:8080/v1/chat/completions \\
        -H "Authorization: Bearer $KEY" -H "Content-Type: application/json" \\
        -d '{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Hello!"}]}'

    streaming:
      curl -N http://127.0.0.1:8080/v1/chat/completions \\
        -H "Authorization: Bearer $KEY" -H "Content-Type: application/json" \\
        -d '{"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"Hello!"}]}'

    Python (pip install openai):
      from openai import OpenAI
      client = OpenAI(base_url="http://127.0.0.1:8080/v1", api_key="$KEY")
      r = client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "Hello!"}])
      print(r.choices[0].message.content, r.usage)

    Usage so far:   $BIN usage report   (or: $BIN usage export)
    Metrics:        curl http://127.0.0.1:9091/metrics

MSG
"$BIN" serve --config "$CONFIG"

# Sourced by the scripts that start servers of their own: a free loopback port,
# waiting until something listens on one, and the benchmark gateway's config.
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() {
  for _ in $(seq 1 600); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.1
  done
  echo "nothing listens on $1" >&2
  return 1
}

# bench_gateway_yaml PORT DB THREADS MOCK_PORT [ABLATE]: the config the load
# benchmark gives its gateway (SQLite usage, the mock as provider, a tier
# whose limits never bind), on stdout.
bench_gateway_yaml() {
  cat <<YAML
listen: "127.0.0.1:$1"
metrics_listen: "127.0.0.1:$(free_port)"
storage: "sqlite://$2"
server: { threads: $3, grace_period_seconds: 0, graceful_shutdown_timeout_seconds: 1 }
bench_ablate: [${5:-}]
providers:
  - name: mock
    base_url: "http://127.0.0.1:$4/v1"
    models:
      - name: gpt-4o-mini
        tokenizer: o200k_base
        input_price_per_mtok: 0.15
        output_price_per_mtok: 0.60
tiers:
  bench: { requests_per_minute: 4000000000 }
YAML
}

#!/usr/bin/env bash
# The whole test suite, from a fresh machine: starts RabbitMQ if it is not
# up, creates the Python venv with nuropb for the interop tests, installs the
# cargo-generate CLI if missing, then lint and test everything (the runtime,
# and the generated-BFF tests under tests/).
set -euo pipefail
cd "$(dirname "$0")/.."

broker_up() { (exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null; }
if ! broker_up; then
  echo "starting RabbitMQ" >&2
  rabbitmq-server -detached >/dev/null 2>&1 || true
  for _ in $(seq 1 90); do broker_up && break; sleep 1; done
  broker_up || { echo "RabbitMQ did not come up on 127.0.0.1:5672" >&2; exit 1; }
  sleep 2
fi

bash scripts/setup-python.sh

if ! cargo generate --version 2>/dev/null | grep -q '0\.23\.14'; then
  echo "installing cargo-generate 0.23.14 (builds on Rust 1.95)" >&2
  cargo install cargo-generate --version 0.23.14 --locked
fi

export USER="${USER:-bff}"
cargo fmt --check
cargo clippy --all-targets -- -D warnings
cargo test --all-targets "$@"

#!/usr/bin/env bash
# The whole test suite, from a fresh machine: starts RabbitMQ if it is not
# up, creates the Python venv with nuropb for the interop tests, installs the
# cargo-generate CLI, the frontend kit's npm packages (typescript,
# playwright-core: frontend-tests/package-lock.json) and chromium if
# missing, then lint and test everything (the runtime, the generated-BFF
# tests and the frontend tests under tests/).
set -euo pipefail
cd "$(dirname "$0")/.."

# A full run writes its build to target/: 4.5 GiB as .ci/run builds it (no
# incremental state, line tables only), about 12 GiB with cargo's defaults.
# Say so before starting rather than fail at a linker that could not write.
GB_NEEDED=6
free_gb() { df -Pk "$1" | awk 'NR==2 {print int($4 / 1048576)}'; }
for where in . "${TMPDIR:-/tmp}"; do
  if [ "$(free_gb "$where")" -lt "$GB_NEEDED" ]; then
    echo "warning: $(free_gb "$where") GiB free on $where; a full run needs about $GB_NEEDED" >&2
  fi
done
# The durable service queues the run declares (most under unique names) are
# deleted at the end, pass or fail, when nothing uses them (see
# scripts/sweep-test-queues.py); only for the local broker rabbitmqctl lists.
QUEUES_BEFORE=""
list_queues() { rabbitmqctl -q list_queues --no-table-headers name 2>/dev/null; }
on_exit() {
  status=$?
  if [ $status -ne 0 ]; then echo "failed ($status); disk:" >&2; df -h . "${TMPDIR:-/tmp}" >&2; fi
  if [ -n "$QUEUES_BEFORE" ]; then
    after=$(mktemp)
    if list_queues > "$after"; then
      .venv/bin/python scripts/sweep-test-queues.py "$QUEUES_BEFORE" "$after" || true
    fi
    rm -f "$after" "$QUEUES_BEFORE"
  fi
}
trap on_exit EXIT

broker_up() { (exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null; }
if ! broker_up; then
  echo "starting RabbitMQ" >&2
  rabbitmq-server -detached >/dev/null 2>&1 || true
  for _ in $(seq 1 90); do broker_up && break; sleep 1; done
  broker_up || { echo "RabbitMQ did not come up on 127.0.0.1:5672" >&2; exit 1; }
  sleep 2
fi

bash scripts/setup-python.sh
if [ -z "${BFF_TEST_AMQP_URL:-}" ] && command -v rabbitmqctl >/dev/null 2>&1; then
  QUEUES_BEFORE=$(mktemp)
  list_queues > "$QUEUES_BEFORE" || { rm -f "$QUEUES_BEFORE"; QUEUES_BEFORE=""; }
fi

if ! cargo generate --version 2>/dev/null | grep -q '0\.23\.14'; then
  echo "installing cargo-generate 0.23.14 (builds on Rust 1.95)" >&2
  cargo install cargo-generate --version 0.23.14 --locked
fi

# The frontend tests: tsc and playwright-core from the lockfile, and a
# headless chromium (Debian's package).
if [ ! -d frontend-tests/node_modules/typescript ] || [ ! -d frontend-tests/node_modules/playwright-core ]; then
  (cd frontend-tests && npm ci --no-audit --no-fund)
fi
if [ -z "${CHROMIUM:-}" ] && ! command -v chromium >/dev/null 2>&1; then
  echo "installing chromium for the console page test" >&2
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null
fi

export USER="${USER:-bff}"
cargo fmt --check
cargo clippy --all-targets -- -D warnings
cargo test --all-targets "$@"
# Doc tests: the public types' examples compile and run (`--all-targets`
# skips them).
cargo test --doc

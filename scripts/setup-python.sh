#!/usr/bin/env bash
# Create .venv with the reference NuroPb implementation (nuropb==0.1.8) that
# the interop tests run as a real mesh service and client. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -x .venv/bin/python ] && .venv/bin/python -c 'import nuropb' 2>/dev/null; then
  exit 0
fi
python3 -m venv .venv
.venv/bin/pip install --quiet --disable-pip-version-check nuropb==0.1.8

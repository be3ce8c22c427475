#!/usr/bin/env bash
# The Python package's tests: creates (once) a virtual environment under .cache/python-venv,
# builds the kvtier wheel with maturin against the workspace's release build, installs it and
# runs pytest (api/python/tests), which start real `kvtier serve` processes.
#
# Usage: scripts/test-python.sh [pytest args]
# Environment: KVTIER_PY_VENV (venv path), KVTIER_BIN (kvtier binary; built here when unset).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
VENV="${KVTIER_PY_VENV:-$ROOT/.cache/python-venv}"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
if [ ! -f "$VENV/.deps" ]; then
  "$VENV/bin/pip" install -q "maturin>=1.7,<2" pytest numpy
  touch "$VENV/.deps"
fi
# The server the tests start.
if [ -z "${KVTIER_BIN:-}" ]; then
  cargo build --release -q -p kvtier --bin kvtier
  export KVTIER_BIN="$ROOT/target/release/kvtier"
fi
# The wheel, built in the workspace's target/ (shares the release build of kvtier-client).
WHEELS="$ROOT/target/wheels"
rm -f "$WHEELS"/kvtier-*.whl
(cd api/python && "$VENV/bin/maturin" build --release -q -o "$WHEELS" \
  --interpreter "$VENV/bin/python" >/dev/null)
"$VENV/bin/pip" install -q --force-reinstall --no-deps "$WHEELS"/kvtier-*.whl
exec "$VENV/bin/python" -m pytest -q api/python/tests "$@"

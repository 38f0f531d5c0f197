#!/usr/bin/env bash
# The Python client's checks, as CI runs them: a fresh venv in a temp dir,
# `pip install ./clients/python[test]`, `mypy --strict` on the package (but
# sessiond/swerex.py, which needs the [swerex] extra: swerex-suite.sh checks it), then
# pytest against the daemon binary at $SESSIOND_BIN (default
# target/debug/sessiond, which `cargo build`/`cargo test` made; nothing is
# built here). pytest's exit 5 (no test ran) fails like any other.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
export SESSIOND_BIN="${SESSIOND_BIN:-$repo/target/debug/sessiond}"
[ -x "$SESSIOND_BIN" ] || { echo "no sessiond binary at $SESSIOND_BIN: run cargo build first" >&2; exit 1; }

python="${PYTHON:-python3}"
command -v "$python" >/dev/null || { echo "$python is required" >&2; exit 1; }
venv="$(mktemp -d "${TMPDIR:-/tmp}/sessiond-pyclient-ci.XXXXXX")"
trap 'rm -rf "$venv"' EXIT
"$python" -m venv "$venv"
# Installed from a copy: an in-tree build leaves build/ and *.egg-info behind.
mkdir "$venv/src"
cp -r "$here/pyproject.toml" "$here/README.md" "$here/src" "$venv/src/"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check "$venv/src[test]"

cd "$here"
"$venv/bin/python" -m mypy --strict --config-file pyproject.toml --cache-dir "$venv/mypy-cache" \
    --exclude 'sessiond/swerex\.py$' src/sessiond
# -p no:cacheprovider: leave no .pytest_cache in the checkout; -rs: say why
# each skipped test was skipped (the swerex ones run in swerex-suite.sh).
"$venv/bin/python" -m pytest -q -rs -p no:cacheprovider tests

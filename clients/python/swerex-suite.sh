#!/usr/bin/env bash
# SWE-ReX's own execution tests against sessiond, as CI runs them: a fresh venv,
# `pip install ./clients/python[swerex,test]` (plus pytest-asyncio and aiohttp,
# which SWE-ReX's test file needs and its package does not declare), `mypy
# --strict` on the whole package (sessiond/swerex.py included), our own tests of
# the adapter (tests/test_swerex.py), then SWE-ReX 1.4.0's source distribution,
# downloaded now (its tests are not copied into this repository), with our
# conftest.py (swerex_conftest/) and an empty __init__.py beside its
# tests/test_execution.py, run unmodified against the daemon at $SESSIOND_BIN.
# Fails unless every test passes but those listed, with their outcome, in
# swerex_conftest/expected.txt.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
export SESSIOND_BIN="${SESSIOND_BIN:-$repo/target/debug/sessiond}"
[ -x "$SESSIOND_BIN" ] || { echo "no sessiond binary at $SESSIOND_BIN: run cargo build first" >&2; exit 1; }
SWEREX_VERSION=1.4.0
EXPECTED_TOTAL=50

python="${PYTHON:-python3}"
command -v "$python" >/dev/null || { echo "$python is required" >&2; exit 1; }
venv="$(mktemp -d "${TMPDIR:-/tmp}/sessiond-swerex-ci.XXXXXX")"
trap 'rm -rf "$venv"' EXIT
"$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip --quiet --disable-pip-version-check)
mkdir "$venv/src"
cp -r "$here/pyproject.toml" "$here/README.md" "$here/src" "$venv/src/"
"${pip[@]}" install "$venv/src[swerex,test]" "swe-rex==$SWEREX_VERSION" "pytest-asyncio>=0.23,<2" aiohttp

cd "$here"
"$venv/bin/python" -m mypy --strict --config-file pyproject.toml --cache-dir "$venv/mypy-cache" src/sessiond
SESSIOND_REQUIRE_SWEREX=1 "$venv/bin/python" -m pytest -q -p no:cacheprovider tests/test_swerex.py

"${pip[@]}" download --no-deps --no-binary :all: "swe-rex==$SWEREX_VERSION" -d "$venv/sdist"
tar -xzf "$venv/sdist/swe_rex-$SWEREX_VERSION.tar.gz" -C "$venv/sdist"
suite="$venv/sdist/swe_rex-$SWEREX_VERSION"
[ ! -e "$suite/tests/conftest.py" ] || { echo "the sdist ships a conftest.py now: check what it provides" >&2; exit 1; }
cp "$here/swerex_conftest/conftest.py" "$suite/tests/conftest.py"
: > "$suite/tests/__init__.py"   # test_execution.py imports `.conftest`
# From the sdist's root, so its own pytest settings apply (asyncio_mode = "auto").
cd "$suite"
set +e
"$venv/bin/python" -m pytest -p no:cacheprovider -rA --junitxml="$venv/junit.xml" tests/test_execution.py
set -e
"$venv/bin/python" - "$venv/junit.xml" "$here/swerex_conftest/expected.txt" "$EXPECTED_TOTAL" <<'PY'
import sys
import xml.etree.ElementTree as ET

junit, expected_file, total = sys.argv[1], sys.argv[2], int(sys.argv[3])
expected = {}
for line in open(expected_file):
    if line.strip() and not line.startswith("#"):
        name, outcome, reason = line.split(maxsplit=2)
        expected[name] = (outcome, reason.strip())
outcomes = {}
for case in ET.parse(junit).getroot().iter("testcase"):
    kinds = {child.tag: child for child in case}
    if "failure" in kinds:
        outcome = "failed"
    elif "error" in kinds:
        outcome = "error"
    elif "skipped" in kinds:
        outcome = "xfailed" if kinds["skipped"].get("type") == "pytest.xfail" else "skipped"
    else:
        outcome = "passed"
    outcomes[case.get("name")] = outcome
bad = []
if len(outcomes) != total:
    bad.append(f"{len(outcomes)} tests ran, expected {total}")
for name, outcome in sorted(outcomes.items()):
    want = expected.get(name, ("passed", ""))[0]
    if outcome != want:
        bad.append(f"{name}: {outcome}, expected {want}")
for name in expected:
    if name not in outcomes:
        bad.append(f"{name}: listed in {expected_file} but did not run")
passed = sum(o == "passed" for o in outcomes.values())
print(f"SWE-ReX's test_execution.py against sessiond: {passed} of {len(outcomes)} passed")
for name, (outcome, reason) in sorted(expected.items()):
    print(f"  expected {outcome}: {name} ({reason})")
if bad:
    print("UNEXPECTED:\n  " + "\n  ".join(bad))
    sys.exit(1)
PY

"""The README's first example, run as written against a real daemon."""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

from conftest import Daemon

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_example_runs(daemon: Daemon) -> None:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    example = blocks[0]
    assert len(example.strip().splitlines()) == 5, "the README promises a five-line example"
    out = subprocess.run(
        [sys.executable, "-c", example],
        env={**os.environ, "SESSIOND_SOCKET": daemon.socket},
        capture_output=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr.decode()
    assert out.stdout == b"hello from /tmp\n"

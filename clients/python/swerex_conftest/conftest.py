"""The fixtures of SWE-ReX's tests/test_execution.py, backed by sessiond.

clients/python/swerex-suite.sh puts this file beside the test file of SWE-ReX's
source distribution (which ships no conftest of its own) and runs that file
unmodified. ``remote_runtime`` is a :class:`sessiond.swerex.SessiondRuntime` on
a real daemon: the binary at ``$SESSIOND_BIN``, started once for the run in a
temp dir of its own and stopped with SIGTERM at the end (it must exit 0).
"""

from __future__ import annotations

import os
import pathlib
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import AsyncIterator, Iterator

import pytest
from swerex.runtime.abstract import BashAction, CloseBashSessionRequest, Command, CreateBashSessionRequest

from sessiond.swerex import SessiondRuntime


class _Action(BashAction):
    # As SWE-ReX's own conftest: a test that hangs fails after 5 s.
    timeout: float | None = 5


class _Command(Command):
    timeout: float | None = 5


def _answers(path: str) -> bool:
    s = socket.socket(socket.AF_UNIX)
    try:
        s.connect(path)
        return True
    except OSError:
        return False
    finally:
        s.close()


@pytest.fixture(scope="session")
def sessiond_socket() -> Iterator[str]:
    binary = os.environ.get("SESSIOND_BIN")
    if not binary or not os.path.isfile(binary):
        pytest.fail(f"SESSIOND_BIN must name the sessiond binary (got {binary!r})")
    with tempfile.TemporaryDirectory(prefix="sessiond-swerex-") as d:
        os.chmod(d, 0o700)
        path = f"{d}/sessiond.sock"
        work = pathlib.Path(d, "work")
        work.mkdir()
        log = pathlib.Path(d, "daemon.log")
        # The sessions find the python of this venv first, as the commands of
        # SWE-ReX's own server (run from its test process) do: the tests call
        # `python`.
        venv_bin = os.path.dirname(sys.executable)
        pathlib.Path(d, "config.toml").write_text(
            f"""
[server]
socket = "{path}"
shutdown_grace = "5s"
[sessions]
default_cwd = "{work}"
[commands]
kill_grace = "300ms"
[cgroups]
mode = "off"
[commands.env]
PATH = "{venv_bin}:/usr/local/bin:/usr/bin:/bin"
LANG = "C.UTF-8"
"""
        )
        with open(log, "ab") as out:
            daemon = subprocess.Popen(
                [binary, "serve", "--config", f"{d}/config.toml"],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=out,
            )
        try:
            deadline = time.monotonic() + 20
            while not _answers(path):
                if daemon.poll() is not None:
                    pytest.fail(f"the daemon exited with {daemon.returncode}:\n{log.read_text()}")
                if time.monotonic() > deadline:
                    pytest.fail(f"the daemon did not answer on {path} within 20 s")
                time.sleep(0.02)
            yield path
        finally:
            daemon.send_signal(signal.SIGTERM)
            try:
                code = daemon.wait(timeout=30)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait()
                raise
            assert code == 0, f"the daemon exited {code} on SIGTERM:\n{log.read_text()}"


@pytest.fixture
async def remote_runtime(sessiond_socket: str) -> AsyncIterator[SessiondRuntime]:
    # The one line a SWE-ReX user changes.
    r = SessiondRuntime(sessiond_socket)
    yield r
    await r.close()


@pytest.fixture
async def runtime_with_default_session(remote_runtime: SessiondRuntime) -> AsyncIterator[SessiondRuntime]:
    await remote_runtime.create_session(CreateBashSessionRequest())
    yield remote_runtime
    await remote_runtime.close_session(CloseBashSessionRequest())

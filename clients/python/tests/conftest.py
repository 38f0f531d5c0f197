"""Fixtures: a real sessiond daemon per test module (or per test, with its own config).

The daemon binary is ``$SESSIOND_BIN``, default ``<repo>/target/debug/sessiond``
(built by ``cargo build`` / ``cargo test``; nothing is built here). Each daemon
gets a temp dir (0700) holding its config, its socket and its log; it is
stopped with SIGTERM and must exit 0.
"""

from __future__ import annotations

import os
import pathlib
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from typing import Callable, Iterator, Optional

import pytest

import sessiond

REPO = pathlib.Path(__file__).resolve().parents[3]


def daemon_binary() -> pathlib.Path:
    path = pathlib.Path(os.environ.get("SESSIOND_BIN") or REPO / "target" / "debug" / "sessiond")
    if not path.is_file():
        pytest.fail(f"no sessiond binary at {path}: run `cargo build` first or set SESSIOND_BIN")
    return path


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Polls ``condition`` until it holds; fails the test after ``timeout`` seconds."""
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


class Daemon:
    """A running daemon: ``socket`` is its path, ``work`` the sessions' default cwd."""

    def __init__(self, extra_config: str = "", server_extra: str = "", commands_extra: str = "") -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="sessiond-py-")
        self.dir = pathlib.Path(self._dir.name)
        os.chmod(self.dir, 0o700)
        self.socket = str(self.dir / "sessiond.sock")
        self.work = self.dir / "work"
        self.work.mkdir()
        self.log = self.dir / "daemon.log"
        config = self.dir / "config.toml"
        config.write_text(
            f"""
[server]
socket = "{self.socket}"
shutdown_grace = "5s"
{server_extra}
[sessions]
default_cwd = "{self.work}"
[commands]
kill_grace = "300ms"
{commands_extra}
[cgroups]
mode = "off"
[commands.env]
PATH = "/usr/local/bin:/usr/bin:/bin"
LANG = "C.UTF-8"
SESSIOND_TEST_TAG = "py-{uuid.uuid4().hex}"
"""
            + extra_config
        )
        with open(self.log, "ab") as log:
            self.process: Optional[subprocess.Popen[bytes]] = subprocess.Popen(
                [str(daemon_binary()), "serve", "--config", str(config)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=log,
                env={**os.environ, "RUST_LOG": "info"},
            )
        wait_until(self._answers, 20, f"the daemon's socket {self.socket}")

    def _answers(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            pytest.fail(f"the daemon exited with {self.process.returncode}:\n{self.log.read_text()}")
        s = socket.socket(socket.AF_UNIX)
        try:
            s.connect(self.socket)
            return True
        except OSError:
            return False
        finally:
            s.close()

    def client(self, **kwargs: object) -> sessiond.Client:
        return sessiond.Client(self.socket, timeout=30, **kwargs)  # type: ignore[arg-type]

    def stop(self) -> int:
        """SIGTERM, then the exit code (the daemon drains within its 5 s grace)."""
        assert self.process is not None
        process, self.process = self.process, None
        process.send_signal(signal.SIGTERM)
        try:
            code = process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            raise
        return code

    def close(self) -> None:
        try:
            if self.process is not None:
                code = self.stop()
                assert code == 0, f"the daemon exited {code} on SIGTERM:\n{self.log.read_text()}"
            assert not os.path.exists(self.socket), "the daemon left its socket behind"
        finally:
            self._dir.cleanup()


@pytest.fixture(scope="module")
def daemon() -> Iterator[Daemon]:
    """One daemon for the tests of a module (each test makes its own sessions)."""
    d = Daemon()
    try:
        yield d
    finally:
        d.close()


@pytest.fixture
def make_daemon() -> Iterator[Callable[..., Daemon]]:
    """A daemon with extra config for one test."""
    made = []

    def make(extra: str, server_extra: str = "", commands_extra: str = "") -> Daemon:
        d = Daemon(extra, server_extra, commands_extra)
        made.append(d)
        return d

    yield make
    for d in made:
        d.close()


@pytest.fixture
def client(daemon: Daemon) -> Iterator[sessiond.Client]:
    with daemon.client() as c:
        yield c

"""Pseudo-terminals through both clients: ``pty=(rows, cols)`` on run/stream/start, ``resize``, keystrokes."""

from __future__ import annotations

import asyncio
import time
from typing import Awaitable, Callable, List, TypeVar

import pytest

import sessiond
from sessiond import AsyncClient, Client, CommandHandle

from conftest import Daemon

T = TypeVar("T")


def read_until(h: CommandHandle, text: bytes, timeout: float = 15.0) -> bytes:
    """Reads ``h`` until its output so far holds ``text``; returns that output."""
    out = b""
    end = time.monotonic() + timeout
    while text not in out:
        assert time.monotonic() < end, f"no {text!r} within {timeout}s: {out!r}"
        r = h.read(wait_s=1)
        assert r.stderr == b""
        out += r.stdout
        assert not (r.done and not r.stdout and text not in out), f"ended without {text!r}: {out!r}"
    return out


def test_ping_lists_pty(client: Client) -> None:
    assert "pty" in client.ping().features


def test_python_repl_on_a_pty(client: Client) -> None:
    with client.session() as s:
        h = s.start("python3 -q", pty=(24, 80), timeout_s=30)
        assert read_until(h, b">>> ") == b">>> "
        assert h.write("1+1\n") == 4
        assert read_until(h, b"2\r\n>>> ") == b"1+1\r\n2\r\n>>> "
        h.close_stdin()  # ^D on a terminal
        result = h.wait(timeout=20)
        assert result.exit_code == 0 and result.stderr == b"" and result.stderr_total_bytes == 0


def test_resize(client: Client) -> None:
    with client.session() as s:
        # Each typed line prints the size the terminal has then.
        h = s.start("while read -r l; do stty size; done", pty=(24, 80), timeout_s=30)
        h.write("\n")
        read_until(h, b"24 80\r\n")
        assert h.resize(40, 100) is True
        h.write("\n")
        read_until(h, b"40 100\r\n")
        assert client.resize(h.command_id, 41, 101) is True
        h.write("\n")
        read_until(h, b"41 101\r\n")
        h.close_stdin()
        assert h.wait(timeout=20).exit_code == 0
        with pytest.raises(sessiond.InvalidRequest, match="ended"):
            h.resize(10, 10)


def test_ctrl_c(client: Client) -> None:
    with client.session() as s:
        s.run("x=kept")
        # `read` is a builtin: a ^C reaches it with no fork in between (bash
        # itself may lose a ^C typed while it forks or reaps a child).
        h = s.start("echo ready; while :; do read -r line; done", pty=(24, 80), timeout_s=30)
        read_until(h, b"ready\r\n")
        h.write("\x03")
        result = h.wait(timeout=20)
        assert result.signal == 2 and result.killed_by is None and result.stdout.endswith(b"^C")
        assert s.run("echo $x").stdout == b"kept\n"


def test_run_and_stream_with_pty(client: Client) -> None:
    with client.session() as s:
        seen: List[bytes] = []
        result = s.run("[ -t 1 ] && echo tty; echo err >&2", pty=(10, 20), on_stdout=seen.append)
        assert result.stdout == b"tty\r\nerr\r\n" and result.stderr == b""
        assert b"".join(seen) == result.stdout
        # Without callbacks too: a pty run is streamed.
        assert s.run("stty size", pty=(11, 21)).stdout == b"11 21\r\n"
        with s.stream("read -p 'name? ' x; echo \"hi $x\"", pty=(24, 80)) as stream:
            it = iter(stream)
            assert next(it).data == b"name? "
            assert stream.resize(30, 90) is True
            stream.write("ann\n")
            rest = b"".join(e.data for e in it)
            assert rest == b"ann\r\nhi ann\r\n" and stream.wait().exit_code == 0


def test_bad_sizes_are_refused(client: Client) -> None:
    with client.session() as s:
        with pytest.raises(sessiond.InvalidRequest, match="pty.rows"):
            s.start("true", pty=(0, 80))
        h = s.start("true")
        h.wait(timeout=20)
        with pytest.raises(sessiond.InvalidRequest, match="pty"):
            h.resize(24, 80)


def run(main: Callable[[], Awaitable[T]]) -> T:
    return asyncio.run(asyncio.wait_for(main(), 60))  # type: ignore[arg-type]


def test_async_pty(daemon: Daemon) -> None:
    async def main() -> None:
        async with AsyncClient(daemon.socket, timeout=30) as c:
            async with c.session() as s:
                h = await s.start(
                    "stty size; trap 'stty size; exit 3' WINCH; echo ready; while :; do sleep 0.05; done", pty=(24, 80)
                )
                out = b""
                while b"ready\r\n" not in out:
                    out += (await h.read(wait_s=1)).stdout
                assert await h.resize(50, 120) is True
                result = await h.wait(timeout=20)
                assert result.exit_code == 3 and result.stdout == b"24 80\r\nready\r\n50 120\r\n"
                with pytest.raises(sessiond.InvalidRequest, match="ended"):
                    await c.resize(h.command_id, 5, 5)

    run(main)

    async def streamed() -> None:
        async with AsyncClient(daemon.socket, timeout=30) as c:
            async with c.session() as s:
                r = await s.run("[ -t 0 ] && echo tty", pty=(24, 80))
                assert r.stdout == b"tty\r\n"
                stream = await s.stream("cat", pty=(24, 80))
                await stream.write("x\n")
                assert await stream.resize(24, 81) is True
                await stream.write("", eof=True)
                assert (await stream.wait()).stdout == b"x\r\nx\r\n"

    run(streamed)

"""The asyncio client against a real daemon."""

from __future__ import annotations

import asyncio
from typing import Any, Awaitable, Callable, List, TypeVar

import pytest

import sessiond
from sessiond import AsyncClient

from conftest import Daemon

T = TypeVar("T")


def run(main: Callable[[], Awaitable[T]]) -> T:
    return asyncio.run(asyncio.wait_for(main(), 60))  # type: ignore[arg-type]


def test_async_methods(daemon: Daemon) -> None:
    async def main() -> None:
        async with AsyncClient(daemon.socket, timeout=30) as c:
            assert (await c.ping()).protocol == 2
            assert "started_total" in (await c.stats()).commands
            async with c.session(env={"A": "b"}) as s:
                sid = s.session_id
                assert sid in {i.session_id for i in await c.list_sessions()}
                r = await s.run("echo $A; echo e >&2; exit 2")
                assert (r.stdout, r.stderr, r.exit_code) == (b"b\n", b"e\n", 2)
            assert sid not in {i.session_id for i in await c.list_sessions()}
            with pytest.raises(sessiond.SessionNotFound):
                await c.run(sid, "true")
            s2 = await c.create_session()
            assert await c.destroy_session(s2.session_id) is True

    run(main)


def test_async_streaming_callbacks_and_iterator(daemon: Daemon) -> None:
    async def main() -> None:
        async with AsyncClient(daemon.socket, timeout=30) as c, c.session() as s:
            out: List[bytes] = []
            err: List[bytes] = []

            async def on_stderr(data: bytes) -> None:
                err.append(data)

            r = await s.run("echo a; echo b >&2; echo c", on_stdout=out.append, on_stderr=on_stderr)
            assert b"".join(out) == b"a\nc\n" == r.stdout and b"".join(err) == b"b\n"
            async with await s.stream("while read l; do echo got $l; done", stdin_open=True, timeout_s=20) as st:
                await st.write("x\n", eof=True)
                data = b"".join([e.data async for e in st])
                result = await st.wait()
            assert data == b"got x\n" == result.stdout and st.command_id == result.command_id

    run(main)


def test_async_start_read_write_cancel_attach(daemon: Daemon) -> None:
    async def main() -> None:
        first = await AsyncClient.connect(daemon.socket, timeout=30)
        s = await first.create_session()
        h = await s.start("read l; echo got $l; sleep 30", stdin_open=True)
        assert await h.write("1\n") == 2
        r = await h.read(wait_s=10)
        assert r.stdout == b"got 1\n" and not r.done
        await first.close()
        async with AsyncClient(daemon.socket, timeout=30) as second:
            again = second.attach(h.command_id)
            with pytest.raises(sessiond.CallTimeout):
                await again.wait(timeout=0.3)
            assert await again.cancel() is True
            result = await again.wait(timeout=20)
            assert result.killed_by == "cancelled" and result.stdout == b"got 1\n"
            h2 = await second.start(s.session_id, "cat", stdin_open=True)
            await h2.close_stdin()
            assert (await h2.wait(timeout=20)).exit_code == 0
            with pytest.raises(sessiond.CommandNotFound):
                await second.read("s-0/c-0")
            h3 = await second.start(s.session_id, "sleep 30")
            with pytest.raises(sessiond.SessionBusy):
                await second.run(s.session_id, "true")
            assert await second.cancel(s.session_id) is True
            await h3.wait(timeout=20)
            await second.destroy_session(s.session_id)

    run(main)


def test_async_pipelining(daemon: Daemon) -> None:
    async def main() -> None:
        async with AsyncClient(daemon.socket, timeout=30) as c, c.session() as a, c.session() as b:
            slow = asyncio.get_running_loop().create_task(a.run("sleep 30"))
            while not any(i.busy for i in await c.list_sessions() if i.session_id == a.session_id):
                await asyncio.sleep(0.02)
            rb, pong = await asyncio.gather(b.run("echo b"), c.ping())
            assert (rb.stdout, pong.pong) == (b"b\n", True)
            assert not slow.done(), "the second run waited for the first"
            assert await a.cancel() is True
            assert (await slow).killed_by == "cancelled"

    run(main)


def test_async_rate_limited_and_retry(make_daemon: Callable[..., Daemon]) -> None:
    d = make_daemon("[rate_limit]\nrequests_per_second = 1\nburst = 1\n")

    async def main() -> None:
        async with AsyncClient(d.socket, timeout=30) as c:
            await c.stats()
            with pytest.raises(sessiond.RateLimited) as e:
                await c.stats()
            assert e.value.retry_after is not None and e.value.retry_after > 0
        async with AsyncClient(d.socket, timeout=30, retry=True) as c:
            before = (await c.stats()).clients["rate_limited_total"]
            after = (await c.stats()).clients["rate_limited_total"]  # refused, then admitted
            assert after > before

    run(main)


def test_async_not_connected() -> None:
    async def main() -> Any:
        return await AsyncClient("/nonexistent/x.sock").ping()

    with pytest.raises(sessiond.ConnectionClosed):
        run(main)
    with pytest.raises(sessiond.ConnectFailed):
        run(lambda: AsyncClient.connect("/nonexistent/x.sock"))

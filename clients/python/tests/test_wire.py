"""The client against a scripted fake daemon: what the real one cannot be made to send
(OVERLOADED, unknown codes, events, fields and killed_by values, silence), and framing."""

from __future__ import annotations

import asyncio
import os
import pathlib
import socket
import struct
import threading
from typing import Any, Callable, Dict, List

import msgpack
import pytest

import sessiond
from sessiond import _core

# A handler gets each request and returns the frames to answer it with.
Handler = Callable[[Dict[str, Any]], List[Dict[str, Any]]]


class FakeDaemon:
    """Answers each request of one connection with what ``handler`` returns."""

    def __init__(self, path: pathlib.Path, handler: Handler) -> None:
        self.path = path
        self.handler = handler
        self.requests: List[Dict[str, Any]] = []
        self._listener = socket.socket(socket.AF_UNIX)
        self._listener.bind(str(path))
        self._listener.listen(4)
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        try:
            conn, _ = self._listener.accept()
        except OSError:
            return
        with conn:
            f = conn.makefile("rb")
            while True:
                header = f.read(4)
                if len(header) < 4:
                    return
                body = f.read(struct.unpack(">I", header)[0])
                request = msgpack.unpackb(body, raw=False)
                self.requests.append(request)
                for frame in self.handler(request):
                    data = msgpack.packb(frame, use_bin_type=True)
                    conn.sendall(struct.pack(">I", len(data)) + data)

    def close(self) -> None:
        self._listener.close()


@pytest.fixture
def fake(tmp_path: pathlib.Path) -> Any:
    made: List[FakeDaemon] = []

    def make(handler: Handler) -> FakeDaemon:
        d = FakeDaemon(tmp_path / f"fake{len(made)}.sock", handler)
        made.append(d)
        return d

    yield make
    for d in made:
        d.close()


def overloaded_once(retry_after_ms: int) -> Handler:
    seen = {"n": 0}

    def handler(req: Dict[str, Any]) -> List[Dict[str, Any]]:
        seen["n"] += 1
        if seen["n"] == 1:
            return [{"id": req["id"], "error": {"code": "OVERLOADED", "message": "over budget", "retry_after_ms": retry_after_ms}}]
        return [{"id": req["id"], "result": {"sessions": [], "future": 1}}]

    return handler


def test_the_documented_ping_frame() -> None:
    assert _core.encode_request(1, "system.ping", None) == bytes.fromhex(
        "00000018" "82" "a26964" "01" "a66d6574686f64" "ab73797374656d2e70696e67"
    )


def test_overloaded_is_retried_after_retry_after_ms(fake: Any) -> None:
    d = fake(overloaded_once(50))
    with sessiond.Client(d.path, retry=True, timeout=5) as c:
        assert c.list_sessions() == []
    assert len(d.requests) == 2 and d.requests[0]["id"] != d.requests[1]["id"]


def test_overloaded_without_retry(fake: Any) -> None:
    d = fake(overloaded_once(50))
    with sessiond.Client(d.path, timeout=5) as c:
        with pytest.raises(sessiond.Overloaded) as e:
            c.list_sessions()
    assert e.value.retry_after == pytest.approx(0.05)
    assert isinstance(e.value, sessiond.SessiondError)


def test_retry_gives_up_when_retry_after_is_past_the_call_timeout(fake: Any) -> None:
    d = fake(overloaded_once(10_000))
    with sessiond.Client(d.path, retry=True) as c:
        with pytest.raises(sessiond.Overloaded):
            c.list_sessions(timeout=1)


def test_unknown_error_code_is_the_base_class(fake: Any) -> None:
    d = fake(lambda req: [{"id": req["id"], "error": {"code": "FROM_THE_FUTURE", "message": "m", "hint": 3}}])
    with sessiond.Client(d.path, timeout=5) as c:
        with pytest.raises(sessiond.SessiondError) as e:
            c.ping()
    assert type(e.value) is sessiond.SessiondError
    assert e.value.code == "FROM_THE_FUTURE" and e.value.details == {"hint": 3}


NEWER_RESULT = {
    "command_id": "s-1/c-2",
    "exit_code": None,
    "signal": 9,
    "timed_out": False,
    "killed_by": "frozen_by_operator",
    "stdout": b"ab",
    "stderr": b"",
    "stdout_truncated": False,
    "stderr_truncated": False,
    "stdout_total_bytes": 2,
    "stderr_total_bytes": 0,
    "duration_ms": 3,
    "cpu_ms": None,
    "max_rss_bytes": None,
    "cwd": "/",
    "a_field_from_the_future": 42,
}


def newer_stream(req: Dict[str, Any]) -> List[Dict[str, Any]]:
    i = req["id"]
    return [
        {"id": i, "event": "started", "command_id": "s-1/c-2"},
        {"id": i, "event": "progress", "percent": 50},
        {"id": 999, "event": "output", "stream": "stdout", "offset": 0, "data": b"not ours"},
        {"id": i, "event": "output", "stream": "stdout", "offset": 0, "data": b"a"},
        {"id": i, "event": "output", "stream": "pty", "offset": 0, "data": b"?"},
        {"id": i, "event": "output", "stream": "stdout", "offset": 1, "data": b"b"},
        {"id": i, "result": NEWER_RESULT},
    ]


def test_unknown_events_fields_and_killed_by_are_tolerated(fake: Any) -> None:
    d = fake(newer_stream)
    out: List[bytes] = []
    with sessiond.Client(d.path, timeout=5) as c:
        r = c.run("s-1", "x", on_stdout=out.append)
        assert out == [b"a", b"b"]
        assert r.killed_by == "frozen_by_operator" and r.signal == 9 and r.cpu_ms is None
        assert r.extra == {"a_field_from_the_future": 42}
        # Not sent (an older daemon): None.
        assert r.pids_limit_hits is None
        with c.stream("s-1", "x") as st:
            streams = [(e.stream, e.data) for e in st]
        assert st.command_id == "s-1/c-2"
        assert streams == [("stdout", b"a"), ("pty", b"?"), ("stdout", b"b")]


def test_pids_limit_hits_decode_and_stay_optional() -> None:
    r = sessiond.types.ExecResult.from_wire({**NEWER_RESULT, "pids_limit_hits": 7})
    assert r.pids_limit_hits == 7 and "pids_limit_hits" not in r.extra
    info = sessiond.types.SessionInfo.from_wire({"session_id": "s-1", "pids_limit_hits": 3})
    assert info.pids_limit_hits == 3
    assert sessiond.types.SessionInfo.from_wire({"session_id": "s-1"}).pids_limit_hits is None


def test_a_silent_daemon_times_the_call_out(fake: Any) -> None:
    d = fake(lambda req: [] if req["method"] == "system.stats" else [{"id": req["id"], "result": {"pong": True}}])
    with sessiond.Client(d.path) as c:
        with pytest.raises(sessiond.CallTimeout):
            c.stats(timeout=0.2)
        assert isinstance(sessiond.CallTimeout("x"), TimeoutError)
        assert c.ping(timeout=5).pong  # still usable
        assert c._calls == {}  # the abandoned call is forgotten


def test_nil_id_invalid_request_keeps_the_connection(fake: Any) -> None:
    def handler(req: Dict[str, Any]) -> List[Dict[str, Any]]:
        return [
            {"id": None, "error": {"code": "INVALID_REQUEST", "message": "bad frame"}},
            {"id": req["id"], "result": {"pong": True}},
        ]

    d = fake(handler)
    with sessiond.Client(d.path, timeout=5) as c:
        assert c.ping().pong and c.ping().pong


def test_nil_id_refusal_fails_every_call(fake: Any) -> None:
    d = fake(lambda req: [{"id": None, "error": {"code": "TOO_MANY_CONNECTIONS", "message": "full", "limit": 1}}])
    with sessiond.Client(d.path, timeout=5) as c:
        with pytest.raises(sessiond.TooManyConnections) as e:
            c.ping()
        assert e.value.limit == 1
        with pytest.raises(sessiond.TooManyConnections):
            c.stats()


def test_async_overloaded_retry_and_unknowns(fake: Any) -> None:
    d1 = fake(overloaded_once(20))
    d2 = fake(newer_stream)

    async def main() -> None:
        async with sessiond.AsyncClient(d1.path, retry=True, timeout=5) as c:
            assert await c.list_sessions() == []
        async with sessiond.AsyncClient(d2.path, timeout=5) as c:
            r = await c.run("s-1", "x", on_stdout=lambda b: None)
            assert r.killed_by == "frozen_by_operator"

    asyncio.run(main())
    assert len(d1.requests) == 2


def test_default_socket_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SESSIOND_SOCKET", "/x/y.sock")
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/run/user/7")
    assert sessiond.default_socket_path() == "/x/y.sock"
    monkeypatch.delenv("SESSIOND_SOCKET")
    assert sessiond.default_socket_path() == "/run/user/7/sessiond.sock"
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    assert sessiond.default_socket_path() == f"/tmp/sessiond-{os.getuid()}/sessiond.sock"


def test_a_directory_writable_by_others_is_refused(tmp_path: pathlib.Path, fake: Any) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    d = FakeDaemon(shared / "s.sock", lambda req: [{"id": req["id"], "result": {"pong": True}}])
    try:
        os.chmod(shared, 0o777)
        with pytest.raises(sessiond.UnsafeSocketDir):
            sessiond.Client(d.path)
        link = tmp_path / "link"
        link.symlink_to(shared)
        os.chmod(shared, 0o700)
        with pytest.raises(sessiond.UnsafeSocketDir):
            sessiond.Client(link / "s.sock")
        with sessiond.Client(link / "s.sock", insecure_socket_dir=True, timeout=5) as c:
            assert c.ping().pong
    finally:
        d.close()


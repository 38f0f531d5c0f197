"""The blocking client against a real daemon: every method, streaming, handles, errors."""

from __future__ import annotations

import threading
from typing import Any, Callable, List

import pytest

import sessiond
from sessiond import Client

from conftest import Daemon, wait_until


def test_ping_and_stats(client: Client) -> None:
    pong = client.ping()
    assert pong.pong is True
    assert pong.protocol == 2
    assert {"stream", "start"} <= set(pong.features)
    assert pong.uptime_ms >= 0 and pong.version
    stats = client.stats()
    assert stats.clients["connections"] >= 1
    assert "max" in stats.sessions and "started_total" in stats.commands
    assert stats.runtime["draining"] is False


def test_session_lifecycle_and_list(client: Client) -> None:
    s = client.create_session(env={"GREETING": "hi"})
    try:
        assert s.session_id.startswith("s-")
        listed = {i.session_id: i for i in client.list_sessions()}
        assert s.session_id in listed
        info = listed[s.session_id]
        assert info.busy is False and info.command_ids == [] and info.command_id is None
        assert s.run("echo $GREETING").text() == "hi\n"
    finally:
        assert client.destroy_session(s.session_id) is True
    assert s.session_id not in {i.session_id for i in client.list_sessions()}
    with pytest.raises(sessiond.SessionNotFound):
        client.destroy_session(s.session_id)


def test_session_context_manager_destroys_the_session(client: Client) -> None:
    with client.session() as s:
        assert s.run("true").exit_code == 0
        sid = s.session_id
    assert sid not in {i.session_id for i in client.list_sessions()}
    with pytest.raises(sessiond.SessionNotFound):
        client.run(sid, "true")
    # Also when the block raises.
    with pytest.raises(RuntimeError):
        with client.session() as s:
            sid = s.session_id
            raise RuntimeError("boom")
    assert sid not in {i.session_id for i in client.list_sessions()}


def test_run_result_fields(client: Client, daemon: Daemon) -> None:
    with client.session() as s:
        r = s.run("printf 'out\\xff'; printf err >&2; cd /tmp; exit 3")
        assert r.exit_code == 3 and r.signal is None and r.killed_by is None
        assert r.timed_out is False and not r.ok
        assert r.stdout == b"out\xff" and isinstance(r.stdout, bytes)
        assert r.text() == "out\ufffd" and r.stderr_text() == "err"
        assert r.stdout_total_bytes == 4 and r.stderr_total_bytes == 3
        assert r.stdout_truncated is False and r.cwd == "/tmp"
        assert r.command_id is not None and r.command_id.startswith(s.session_id)
        assert r.duration_ms >= 0 and r.state_error is None
        # Terminal state carries over; stdin and env are passed.
        assert s.run("pwd").text() == "/tmp\n"
        assert s.run("cat", stdin=b"abc").stdout == b"abc"
        assert s.run("echo $X", env={"X": "y"}).text() == "y\n"
        killed = s.run("sleep 30", timeout_s=0.3)
        assert killed.killed_by == "timeout" and killed.timed_out and killed.exit_code is None


def test_run_with_callbacks_streams_output(client: Client) -> None:
    out: List[bytes] = []
    err: List[bytes] = []
    with client.session() as s:
        r = s.run(
            "for i in 1 2 3; do echo o$i; echo e$i >&2; done",
            on_stdout=out.append,
            on_stderr=err.append,
        )
    assert b"".join(out) == b"o1\no2\no3\n" == r.stdout
    assert b"".join(err) == b"e1\ne2\ne3\n" == r.stderr


def test_callbacks_see_output_before_the_command_ends(client: Client, daemon: Daemon) -> None:
    marker = daemon.dir / "go"
    seen: List[bytes] = []

    def on_stdout(data: bytes) -> None:
        seen.append(data)
        marker.touch()  # the command waits for this before it ends

    with client.session() as s:
        r = s.run(f"echo first; while [ ! -e {marker} ]; do sleep 0.01; done; echo last", on_stdout=on_stdout, timeout_s=20)
    assert r.exit_code == 0 and seen[0].startswith(b"first") and b"".join(seen) == b"first\nlast\n"


def test_stream_iterator(client: Client) -> None:
    with client.session() as s:
        with s.stream("head -c 300000 /dev/zero; echo done >&2") as stream:
            events = list(stream)
            result = stream.wait()
        assert stream.command_id == result.command_id
    stdout = [e for e in events if e.stream == "stdout"]
    offset = 0
    for e in stdout:
        assert e.offset == offset
        offset += len(e.data)
    assert offset == 300000 == result.stdout_total_bytes
    assert b"".join(e.data for e in events if e.stream == "stderr") == b"done\n"


def test_stream_with_open_stdin(client: Client) -> None:
    with client.session() as s:
        with s.stream("while read l; do echo got $l; done", stdin_open=True, timeout_s=20) as stream:
            command_id = stream.started()
            assert command_id.startswith(s.session_id)
            assert stream.write("a\n") == 2
            it = iter(stream)
            assert next(it).data == b"got a\n"
            assert stream.write("b\n", eof=True) == 2
            rest = b"".join(e.data for e in it)
            result = stream.wait()
        assert rest == b"got b\n" and result.stdout == b"got a\ngot b\n" and result.command_id == command_id


def test_start_read_write_wait(client: Client) -> None:
    with client.session() as s:
        h = s.start("while read l; do echo got $l; done; echo bye >&2", stdin_open=True, timeout_s=20)
        assert h.write("one\n") == 4
        r = h.read(wait_s=10)
        assert r.stdout == b"got one\n" and not r.done and r.result is None
        assert (h.stdout_next, r.stdout_offset) == (8, 0)
        assert h.write(b"two\n", eof=True) == 4
        result = h.wait(timeout=20)
        assert result.exit_code == 0
        assert result.stdout == b"got one\ngot two\n" and result.stderr == b"bye\n"
        with pytest.raises(sessiond.InvalidRequest):
            h.write("three\n")
        assert h.cancel() is False  # it has ended


def test_close_stdin(client: Client) -> None:
    with client.session() as s:
        h = s.start("cat", stdin="abc", stdin_open=True, timeout_s=20)
        h.close_stdin()
        assert h.wait(timeout=20).stdout == b"abc"


def test_cancel_by_command_and_by_session(client: Client) -> None:
    with client.session() as s:
        h = s.start("sleep 30")
        assert h.cancel() is True
        assert h.wait(timeout=20).killed_by == "cancelled"
        h2 = s.start("sleep 30")
        assert s.cancel() is True
        assert h2.wait(timeout=20).killed_by == "cancelled"
        assert s.cancel() is False
    with pytest.raises(ValueError):
        client.cancel()


def test_attach_from_a_second_client(daemon: Daemon) -> None:
    first = daemon.client()
    s = first.create_session()
    h = s.start("echo before; read l; echo after $l", stdin_open=True, timeout_s=20)
    assert h.read(wait_s=10).stdout == b"before\n"
    command_id = h.command_id
    first.close()  # the agent "restarts"; the command runs on
    with daemon.client() as second:
        sessions = {i.session_id: i for i in second.list_sessions()}
        assert sessions[s.session_id].command_id == command_id
        again = second.attach(command_id)
        again.write("x\n", eof=True)
        result = again.wait(timeout=20)
        assert result.stdout == b"before\nafter x\n" and result.exit_code == 0
        partial = second.attach(command_id, stdout_offset=7)
        assert partial.read().stdout == b"after x\n"
        second.destroy_session(s.session_id)


def test_errors_map_to_their_classes(client: Client) -> None:
    with pytest.raises(sessiond.SessionNotFound) as not_found:
        client.run("s-00000000000000000000000000000000", "true")
    assert not_found.value.code == "SESSION_NOT_FOUND"
    assert isinstance(not_found.value, sessiond.SessiondError)
    with pytest.raises(sessiond.CommandNotFound):
        client.read("s-00000000000000000000000000000000/c-00000000000000000000000000000000")
    with pytest.raises(sessiond.UnknownMethod):
        client.call("no.such.method")
    with client.session() as s:
        with pytest.raises(sessiond.InvalidRequest):
            s.run("true", timeout_s=-1)
        with pytest.raises(sessiond.StdinTooLarge) as too_large:
            s.run("cat", stdin=b"x" * (1024 * 1024 + 1))
        assert too_large.value.limit == 1024 * 1024
        h = s.start("sleep 30")
        with pytest.raises(sessiond.SessionBusy):
            s.run("true")
        h.cancel()
        h.wait(timeout=20)
    with pytest.raises(sessiond.SpawnFailed):
        client.create_session(init="exit 4")
    assert client.ping().pong  # the connection is still good


def test_frame_too_large_fails_the_connection(daemon: Daemon) -> None:
    with daemon.client() as other, other.session() as s, daemon.client() as c:
        with pytest.raises(sessiond.FrameTooLarge) as e:
            c.run(s.session_id, "cat", stdin=b"x" * (3 * 1024 * 1024))
        assert e.value.limit == 2 * 1024 * 1024
        with pytest.raises(sessiond.FrameTooLarge):
            c.ping()  # a nil-id error is the connection's: every later call fails with it
        assert other.ping().pong


def test_rate_limited_without_and_with_retry(make_daemon: Callable[..., Daemon]) -> None:
    d = make_daemon("[rate_limit]\nrequests_per_second = 1\nburst = 1\n")
    with d.client() as c:
        c.stats()
        with pytest.raises(sessiond.RateLimited) as e:
            c.stats()
        assert e.value.retry_after is not None and 0 < e.value.retry_after <= 1.5
        assert c.ping().pong  # ping is exempt
    with d.client(retry=True) as c:
        before = c.stats().clients["rate_limited_total"]
        after = c.stats().clients["rate_limited_total"]  # refused at first, then admitted
        assert after > before
    with d.client(retry=True, max_retries=0) as c:
        wait_until(lambda: _admitted(c), 5, "a token")
        with pytest.raises(sessiond.RateLimited):
            c.stats()


def _admitted(c: Client) -> bool:
    try:
        c.stats()
        return True
    except sessiond.RateLimited:
        return False


def test_call_timeouts(client: Client) -> None:
    with client.session() as s:
        h = s.start("sleep 30")
        with pytest.raises(sessiond.CallTimeout):
            h.wait(timeout=0.3)
        h.cancel()
        h.wait(timeout=20)
        with pytest.raises(sessiond.CallTimeout):
            s.run("sleep 30", timeout=0.3)
        assert client.ping().pong  # the abandoned call leaves the client usable
        assert s.cancel() is True


def test_concurrent_calls_are_pipelined(client: Client) -> None:
    with client.session() as slow, client.session() as other:
        results: List[Any] = []
        t = threading.Thread(target=lambda: results.append(slow.run("sleep 30; echo slow")))
        t.start()
        wait_until(lambda: any(i.busy for i in client.list_sessions() if i.session_id == slow.session_id), 10, "busy")
        assert other.run("echo fast").text() == "fast\n"
        assert client.ping().pong
        assert results == [], "the second call waited for the first"
        slow.cancel()
        t.join(20)
        assert results[0].killed_by == "cancelled"


def test_connect_failure_names_the_socket(tmp_path: Any) -> None:
    path = tmp_path / "nothing.sock"
    with pytest.raises(sessiond.ConnectFailed) as e:
        Client(path)
    assert str(path) in str(e.value) and "sessiond serve" in str(e.value)
    assert isinstance(e.value, ConnectionError)

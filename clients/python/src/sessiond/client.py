"""The blocking client: one pipelined connection, read by a thread of its own."""

from __future__ import annotations

import dataclasses
import itertools
import queue
import socket
import threading
import time
from types import TracebackType
from typing import (
    Any,
    Callable,
    Dict,
    Iterator,
    List,
    Mapping,
    Optional,
    Tuple,
    Type,
    Union,
)

from . import _core
from .errors import (
    RETRYABLE_CODES,
    CallTimeout,
    ConnectionClosed,
    ProtocolError,
    SessiondError,
)
from .types import ExecResult, OutputEvent, PingResult, ReadResult, SessionInfo, StatsResult

OutputCallback = Callable[[bytes], object]
Stdin = Union[bytes, str, None]


class _Deadline:
    """An absolute point in time (or none) that a call's waits share."""

    def __init__(self, timeout: Optional[float]) -> None:
        self.timeout = timeout
        self.at = None if timeout is None else time.monotonic() + timeout

    def left(self) -> Optional[float]:
        return None if self.at is None else max(0.0, self.at - time.monotonic())


class Client:
    """A connection to sessiond. Thread-safe: calls from many threads are pipelined.

    ``path`` defaults to :func:`sessiond.default_socket_path`. ``timeout``
    (seconds) is the default per-call timeout (None: wait as long as it
    takes); every method takes its own ``timeout=`` too. With
    ``retry=True``, a request refused with ``RATE_LIMITED`` or
    ``OVERLOADED`` is sent again after the daemon's ``retry_after_ms``, at
    most ``max_retries`` times and within the call's timeout.
    """

    def __init__(
        self,
        path: Optional[_core.PathLike] = None,
        *,
        timeout: Optional[float] = None,
        retry: bool = False,
        max_retries: int = 5,
        insecure_socket_dir: bool = False,
    ) -> None:
        self._sock, self.path = _core.connect_socket(path, insecure_socket_dir)
        self.timeout = timeout
        self.retry = retry
        self.max_retries = max_retries
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._calls: Dict[int, "queue.SimpleQueue[_core.Frame]"] = {}
        self._closed: Optional[SessiondError] = None
        self._reader = threading.Thread(target=self._read_loop, name="sessiond-reader", daemon=True)
        self._reader.start()

    # -- connection -------------------------------------------------------

    def close(self) -> None:
        """Closes the connection; calls still waiting get :class:`ConnectionClosed`."""
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()
        if threading.current_thread() is not self._reader:
            self._reader.join(timeout=5)

    def __enter__(self) -> "Client":
        return self

    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        self.close()

    def _read_loop(self) -> None:
        error: SessiondError = ConnectionClosed("the daemon closed the connection")
        try:
            while True:
                header = self._recv_exact(_core.HEADER.size)
                if header is None:
                    break
                (length,) = _core.HEADER.unpack(header)
                body = self._recv_exact(length)
                if body is None:
                    break
                frame = _core.sort_frame(body)
                if frame is None:
                    continue
                if frame.id is None:
                    # A nil id is about the connection (FRAME_TOO_LARGE,
                    # PERMISSION_DENIED…): every call waiting on it fails.
                    # INVALID_REQUEST (a bad frame of ours) leaves it open.
                    if frame.error is not None and frame.error.code != "INVALID_REQUEST":
                        error = frame.error
                        break
                    continue
                with self._lock:
                    call = self._calls.get(frame.id)
                    if call is not None and frame.final:
                        del self._calls[frame.id]
                if call is not None:
                    call.put(frame)
        except OSError as e:
            error = ConnectionClosed(f"connection error: {e}")
        with self._lock:
            self._closed = error
            calls = list(self._calls.items())
            self._calls.clear()
        for call_id, call in calls:
            call.put(_core.Frame(call_id, error=error))

    def _recv_exact(self, n: int) -> Optional[bytes]:
        chunks: List[bytes] = []
        while n > 0:
            chunk = self._sock.recv(min(n, 1 << 20))
            if not chunk:
                return None
            chunks.append(chunk)
            n -= len(chunk)
        return b"".join(chunks)

    # -- calls ------------------------------------------------------------

    def _send(self, method: str, params: Optional[Mapping[str, Any]]) -> "tuple[int, queue.SimpleQueue[_core.Frame]]":
        call: "queue.SimpleQueue[_core.Frame]" = queue.SimpleQueue()
        with self._lock:
            if self._closed is not None:
                raise self._closed
            call_id = next(self._ids) % _core.MAX_ID
            self._calls[call_id] = call
        data = _core.encode_request(call_id, method, params)
        try:
            with self._write_lock:
                self._sock.sendall(data)
        except OSError as e:
            # A refused connection closes before our write: prefer its error frame.
            try:
                frame = call.get(timeout=1.0)
                if frame.error is not None:
                    raise frame.error from e
            except queue.Empty:
                pass
            self._forget(call_id)
            raise ConnectionClosed(f"cannot send: {e}") from e
        return call_id, call

    def _forget(self, call_id: int) -> None:
        with self._lock:
            self._calls.pop(call_id, None)

    def _next_frame(
        self, call_id: int, call: "queue.SimpleQueue[_core.Frame]", deadline: _Deadline
    ) -> _core.Frame:
        try:
            return call.get(timeout=deadline.left())
        except queue.Empty:
            self._forget(call_id)
            raise CallTimeout(f"no answer within {deadline.timeout}s") from None

    def _deadline(self, timeout: Optional[float], extra: float = 0.0) -> _Deadline:
        t = self.timeout if timeout is None else timeout
        return _Deadline(None if t is None else t + extra)

    def _retrying(self, error: SessiondError, attempt: int, deadline: _Deadline) -> bool:
        """Waits before a retry when ``error`` may be retried; False: raise it."""
        if not self.retry or error.code not in RETRYABLE_CODES or attempt >= self.max_retries:
            return False
        delay = _core.retry_delay(error, attempt)
        left = deadline.left()
        if left is not None and delay > left:
            return False
        time.sleep(delay)
        return True

    def call(
        self,
        method: str,
        params: Optional[Mapping[str, Any]] = None,
        *,
        timeout: Optional[float] = None,
        _extra_timeout: float = 0.0,
    ) -> Any:
        """Calls ``method`` and returns its raw ``result`` (for methods this package does not wrap)."""
        deadline = self._deadline(timeout, _extra_timeout)
        for attempt in itertools.count():
            call_id, call = self._send(method, params)
            while True:
                frame = self._next_frame(call_id, call, deadline)
                if frame.final:
                    break
            if frame.error is None:
                return frame.result
            if not self._retrying(frame.error, attempt, deadline):
                raise frame.error
        raise AssertionError("unreachable")

    # -- methods ----------------------------------------------------------

    def ping(self, *, timeout: Optional[float] = None) -> PingResult:
        """``system.ping``."""
        return PingResult.from_wire(self.call("system.ping", timeout=timeout))

    def stats(self, *, timeout: Optional[float] = None) -> StatsResult:
        """``system.stats``."""
        return StatsResult.from_wire(self.call("system.stats", timeout=timeout))

    def create_session(
        self,
        *,
        cwd: Optional[str] = None,
        env: Optional[Mapping[str, str]] = None,
        limits: Optional[Mapping[str, Any]] = None,
        init: Optional[str] = None,
        timeout: Optional[float] = None,
    ) -> "Session":
        """``session.create``: a :class:`Session`, destroyed on leaving its ``with`` block."""
        result = self.call(
            "session.create",
            _core.params(
                cwd=cwd,
                env=dict(env) if env is not None else None,
                limits=dict(limits) if limits is not None else None,
                init=init,
            ),
            timeout=timeout,
        )
        if not isinstance(result, Mapping) or not isinstance(result.get("session_id"), str):
            raise ProtocolError(f"session.create result without session_id: {result!r}")
        return Session(self, result["session_id"])

    #: ``client.session()`` reads well in a ``with``: the same as :meth:`create_session`.
    session = create_session

    def destroy_session(self, session_id: str, *, timeout: Optional[float] = None) -> bool:
        """``session.destroy``: ``destroyed`` (true)."""
        result = self.call("session.destroy", {"session_id": session_id}, timeout=timeout)
        return bool(result.get("destroyed")) if isinstance(result, Mapping) else False

    def list_sessions(self, *, timeout: Optional[float] = None) -> List[SessionInfo]:
        """``session.list``: this uid's sessions, oldest first."""
        result = self.call("session.list", timeout=timeout)
        sessions = result.get("sessions") if isinstance(result, Mapping) else None
        return [SessionInfo.from_wire(s) for s in sessions] if isinstance(sessions, list) else []

    def run(
        self,
        session_id: str,
        command: str,
        *,
        timeout_s: Optional[float] = None,
        stdin: Stdin = None,
        env: Optional[Mapping[str, str]] = None,
        keep_output: Optional[str] = None,
        idle_timeout_s: Optional[float] = None,
        pty: Optional[Tuple[int, int]] = None,
        on_stdout: Optional[OutputCallback] = None,
        on_stderr: Optional[OutputCallback] = None,
        timeout: Optional[float] = None,
    ) -> ExecResult:
        """``exec.run``: runs ``command`` in the session and returns its result.

        ``timeout_s`` is the command's timeout (the daemon kills it);
        ``timeout`` is how long this call waits for the answer. With
        ``on_stdout`` or ``on_stderr`` the output is streamed (``stream:
        true``) and each callback gets the bytes of each ``output`` event, in
        the calling thread, as they come.

        ``pty=(rows, cols)`` runs it on a pseudo-terminal of that size (so it
        is streamed): its output, prompts included, comes on stdout only.
        """
        p = _core.exec_params(
            session_id,
            command,
            timeout_s=timeout_s,
            stdin=stdin,
            env=env,
            keep_output=keep_output,
            idle_timeout_s=idle_timeout_s,
            pty=pty,
        )
        # A pty is only for streamed runs (its output comes as it is typed at).
        if on_stdout is None and on_stderr is None and pty is None:
            return ExecResult.from_wire(self.call("exec.run", p, timeout=timeout))
        with ExecStream(self, p, self._deadline(timeout)) as stream:
            for event in stream:
                callback = on_stdout if event.stream == "stdout" else on_stderr
                if callback is not None and event.stream in ("stdout", "stderr"):
                    callback(event.data)
            return stream.wait()

    def stream(
        self,
        session_id: str,
        command: str,
        *,
        timeout_s: Optional[float] = None,
        stdin: Stdin = None,
        env: Optional[Mapping[str, str]] = None,
        keep_output: Optional[str] = None,
        idle_timeout_s: Optional[float] = None,
        stdin_open: bool = False,
        pty: Optional[Tuple[int, int]] = None,
        timeout: Optional[float] = None,
    ) -> "ExecStream":
        """``exec.run`` with ``stream: true``: iterate over the returned :class:`ExecStream`
        for :class:`OutputEvent`\\ s, then take its :meth:`ExecStream.wait` result."""
        p = _core.exec_params(
            session_id,
            command,
            timeout_s=timeout_s,
            stdin=stdin,
            env=env,
            keep_output=keep_output,
            idle_timeout_s=idle_timeout_s,
            stdin_open=stdin_open,
            pty=pty,
        )
        return ExecStream(self, p, self._deadline(timeout))

    def start(
        self,
        session_id: str,
        command: str,
        *,
        timeout_s: Optional[float] = None,
        stdin: Stdin = None,
        env: Optional[Mapping[str, str]] = None,
        keep_output: Optional[str] = None,
        idle_timeout_s: Optional[float] = None,
        stdin_open: bool = False,
        pty: Optional[Tuple[int, int]] = None,
        timeout: Optional[float] = None,
    ) -> "CommandHandle":
        """``exec.start``: a :class:`CommandHandle` as soon as the command runs.

        ``pty=(rows, cols)`` runs it on a pseudo-terminal of that size: output
        comes on stdout only, stdin is open for :meth:`CommandHandle.write`
        (keystrokes: ``"\\x03"`` is Ctrl-C; ``eof`` sends ^D and leaves the
        terminal open), and :meth:`CommandHandle.resize` changes its size.
        """
        result = self.call(
            "exec.start",
            _core.exec_params(
                session_id,
                command,
                timeout_s=timeout_s,
                stdin=stdin,
                env=env,
                keep_output=keep_output,
                idle_timeout_s=idle_timeout_s,
                stdin_open=stdin_open,
                pty=pty,
            ),
            timeout=timeout,
        )
        if not isinstance(result, Mapping) or not isinstance(result.get("command_id"), str):
            raise ProtocolError(f"exec.start result without command_id: {result!r}")
        return CommandHandle(self, result["command_id"])

    def attach(self, command_id: str, *, stdout_offset: int = 0, stderr_offset: int = 0) -> "CommandHandle":
        """A :class:`CommandHandle` for a command started earlier (by any connection of this uid)."""
        return CommandHandle(self, command_id, stdout_offset=stdout_offset, stderr_offset=stderr_offset)

    def read(
        self,
        command_id: str,
        *,
        stdout_offset: int = 0,
        stderr_offset: int = 0,
        wait_s: float = 0,
        timeout: Optional[float] = None,
    ) -> ReadResult:
        """``exec.read``. The call's timeout is extended by ``wait_s``."""
        result = self.call(
            "exec.read",
            _core.params(
                command_id=command_id,
                stdout_offset=stdout_offset,
                stderr_offset=stderr_offset,
                wait_s=wait_s or None,
            ),
            timeout=timeout,
            _extra_timeout=wait_s,
        )
        return ReadResult.from_wire(result)

    def write(
        self,
        command_id: str,
        data: Union[bytes, str] = b"",
        *,
        eof: bool = False,
        timeout: Optional[float] = None,
    ) -> int:
        """``exec.write``: how many bytes of ``data`` the command's stdin took."""
        result = self.call(
            "exec.write",
            _core.params(command_id=command_id, data=data, eof=eof or None),
            timeout=timeout,
        )
        written = result.get("written") if isinstance(result, Mapping) else None
        return written if isinstance(written, int) else 0

    def resize(self, command_id: str, rows: int, cols: int, *, timeout: Optional[float] = None) -> bool:
        """``exec.resize``: the new window size of a command's pseudo-terminal (started
        with ``pty=``); the command's foreground process group gets SIGWINCH."""
        result = self.call(
            "exec.resize",
            {"command_id": command_id, "rows": int(rows), "cols": int(cols)},
            timeout=timeout,
        )
        return bool(result.get("resized")) if isinstance(result, Mapping) else False

    def cancel(
        self,
        session_id: Optional[str] = None,
        *,
        command_id: Optional[str] = None,
        timeout: Optional[float] = None,
    ) -> bool:
        """``exec.cancel`` by ``session_id`` (every running command) or by ``command_id``:
        ``cancelled``, whether something was running."""
        if (session_id is None) == (command_id is None):
            raise ValueError("give exactly one of session_id and command_id")
        result = self.call(
            "exec.cancel", _core.params(session_id=session_id, command_id=command_id), timeout=timeout
        )
        return bool(result.get("cancelled")) if isinstance(result, Mapping) else False


class Session:
    """A session of a :class:`Client`; a context manager that destroys it on exit."""

    def __init__(self, client: Client, session_id: str) -> None:
        self.client = client
        self.session_id = session_id

    def __repr__(self) -> str:
        return f"Session({self.session_id!r})"

    def __enter__(self) -> "Session":
        return self

    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        self.destroy(missing_ok=True)

    def destroy(self, *, missing_ok: bool = False, timeout: Optional[float] = None) -> bool:
        """``session.destroy``; with ``missing_ok`` a session already gone is not an error."""
        from .errors import SessionNotFound

        try:
            return self.client.destroy_session(self.session_id, timeout=timeout)
        except SessionNotFound:
            if missing_ok:
                return False
            raise

    def run(self, command: str, **kwargs: Any) -> ExecResult:
        """:meth:`Client.run` in this session."""
        return self.client.run(self.session_id, command, **kwargs)

    def stream(self, command: str, **kwargs: Any) -> "ExecStream":
        """:meth:`Client.stream` in this session."""
        return self.client.stream(self.session_id, command, **kwargs)

    def start(self, command: str, **kwargs: Any) -> "CommandHandle":
        """:meth:`Client.start` in this session."""
        return self.client.start(self.session_id, command, **kwargs)

    def cancel(self, *, timeout: Optional[float] = None) -> bool:
        """``exec.cancel`` of every command the session runs."""
        return self.client.cancel(self.session_id, timeout=timeout)


class ExecStream:
    """A streaming ``exec.run``: iterate for :class:`OutputEvent`\\ s, then :meth:`wait`.

    ``command_id`` is set once the ``started`` event came. Events of a name
    this package does not know are skipped. Leaving the ``with`` block (or
    :meth:`close`) stops listening; the command runs on.
    """

    def __init__(self, client: Client, params: Dict[str, Any], deadline: _Deadline) -> None:
        self.client = client
        self.command_id: Optional[str] = None
        self._params = dict(params, stream=True)
        self._deadline = deadline
        self._result: Optional[ExecResult] = None
        self._attempt = 0
        self._early: List[OutputEvent] = []
        self._call_id, self._call = client._send("exec.run", self._params)

    def __enter__(self) -> "ExecStream":
        return self

    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        self.close()

    def close(self) -> None:
        """Stops listening (the command is not cancelled)."""
        self.client._forget(self._call_id)

    def _pump(self) -> Optional[OutputEvent]:
        """Takes one frame: an output event, or None (started, unknown event, the end)."""
        frame = self.client._next_frame(self._call_id, self._call, self._deadline)
        if frame.event is not None:
            event = _event(frame.event)
            if isinstance(event, str):
                self.command_id = event
                return None
            return event
        if frame.error is not None:
            # Refusals come before any event: a retry cannot repeat output.
            if self.command_id is None and self.client._retrying(frame.error, self._attempt, self._deadline):
                self._attempt += 1
                self._call_id, self._call = self.client._send("exec.run", self._params)
                return None
            raise frame.error
        self._result = ExecResult.from_wire(frame.result)
        return None

    def started(self) -> str:
        """Waits for the ``started`` event and returns the command id (output that
        comes first is kept for the iteration)."""
        while self.command_id is None and self._result is None:
            event = self._pump()
            if event is not None:
                self._early.append(event)
        if self.command_id is None:
            raise ProtocolError("the command ended without a `started` event")
        return self.command_id

    def __iter__(self) -> Iterator[OutputEvent]:
        while self._early:
            yield self._early.pop(0)
        while self._result is None:
            event = self._pump()
            if event is not None:
                yield event

    def wait(self) -> ExecResult:
        """The result (events not yet iterated are dropped)."""
        for _ in self:
            pass
        assert self._result is not None
        return self._result

    def write(self, data: Union[bytes, str] = b"", *, eof: bool = False) -> int:
        """``exec.write`` to this command (started with ``stdin_open=True``)."""
        return self.client.write(self.started(), data, eof=eof)

    def resize(self, rows: int, cols: int) -> bool:
        """``exec.resize`` of this command's pseudo-terminal (started with ``pty=``)."""
        return self.client.resize(self.started(), rows, cols)


def _event(event: Mapping[str, Any]) -> Union[OutputEvent, str, None]:
    """An ``output`` event, the command id of a ``started`` one, or None (unknown)."""
    name = event.get("event")
    if name == "started":
        command_id = event.get("command_id")
        return command_id if isinstance(command_id, str) else None
    if name == "output":
        data = event.get("data")
        offset = event.get("offset")
        return OutputEvent(
            stream=str(event.get("stream", "")),
            offset=offset if isinstance(offset, int) else 0,
            data=data if isinstance(data, bytes) else b"",
        )
    return None


class CommandHandle:
    """A command by its id (from :meth:`Client.start` or :meth:`Client.attach`).

    The handle keeps its own read offsets (``stdout_next``, ``stderr_next``)
    and the bytes it has read; :meth:`wait` reads on to the end.
    """

    def __init__(self, client: Client, command_id: str, *, stdout_offset: int = 0, stderr_offset: int = 0) -> None:
        self.client = client
        self.command_id = command_id
        self.stdout_next = stdout_offset
        self.stderr_next = stderr_offset
        self._stdout = bytearray()
        self._stderr = bytearray()

    def __repr__(self) -> str:
        return f"CommandHandle({self.command_id!r})"

    def read(self, wait_s: float = 0, *, timeout: Optional[float] = None) -> ReadResult:
        """``exec.read`` from where this handle stopped; moves its offsets on."""
        r = self.client.read(
            self.command_id,
            stdout_offset=self.stdout_next,
            stderr_offset=self.stderr_next,
            wait_s=wait_s,
            timeout=timeout,
        )
        self.stdout_next, self.stderr_next = r.stdout_next, r.stderr_next
        self._stdout += r.stdout
        self._stderr += r.stderr
        return r

    def write(self, data: Union[bytes, str], *, eof: bool = False, timeout: Optional[float] = None) -> int:
        """``exec.write``: how many bytes the command's stdin took (all, unless it stopped reading)."""
        return self.client.write(self.command_id, data, eof=eof, timeout=timeout)

    def close_stdin(self, *, timeout: Optional[float] = None) -> None:
        """``exec.write`` with ``eof``: the command sees the end of its stdin."""
        self.client.write(self.command_id, b"", eof=True, timeout=timeout)

    def resize(self, rows: int, cols: int, *, timeout: Optional[float] = None) -> bool:
        """``exec.resize`` of this command's pseudo-terminal (started with ``pty=``)."""
        return self.client.resize(self.command_id, rows, cols, timeout=timeout)

    def cancel(self, *, timeout: Optional[float] = None) -> bool:
        """``exec.cancel`` by command id: whether it was running."""
        return self.client.cancel(command_id=self.command_id, timeout=timeout)

    def wait(self, timeout: Optional[float] = None) -> ExecResult:
        """Reads to the end and returns the result, whose ``stdout``/``stderr`` are
        every byte this handle read (from its starting offsets on).

        Raises :class:`CallTimeout` when the command has not ended within ``timeout``.
        """
        deadline = _Deadline(timeout)
        while True:
            left = deadline.left()
            if left is not None and left <= 0:
                raise CallTimeout(f"the command did not end within {timeout}s")
            wait_s = _core.MAX_WAIT_S if left is None else max(0.001, min(_core.MAX_WAIT_S, left))
            r = self.read(wait_s)
            if r.done and not r.stdout and not r.stderr:
                if r.result is None:
                    raise ProtocolError("exec.read: done without a result")
                return dataclasses.replace(r.result, stdout=bytes(self._stdout), stderr=bytes(self._stderr))

"""The asyncio client: one pipelined connection, read by a task of its own."""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import itertools
import time
from types import TracebackType
from typing import (
    Any,
    AsyncIterator,
    Awaitable,
    Callable,
    Dict,
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
    SessionNotFound,
)
from .client import _Deadline, _event
from .types import ExecResult, OutputEvent, PingResult, ReadResult, SessionInfo, StatsResult

#: A callback for streamed output: a plain function or a coroutine function.
AsyncOutputCallback = Callable[[bytes], Union[Awaitable[object], object]]
Stdin = Union[bytes, str, None]
_Queue = "asyncio.Queue[_core.Frame]"


class AsyncClient:
    """An asyncio connection to sessiond; calls from many tasks are pipelined.

    Create it with ``await AsyncClient.connect(...)`` or ``async with
    AsyncClient(...) as c``. The options are those of
    :class:`sessiond.Client`.
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
        self._path_arg = path
        self._insecure = insecure_socket_dir
        self.path = ""
        self.timeout = timeout
        self.retry = retry
        self.max_retries = max_retries
        self._ids = itertools.count(1)
        self._calls: Dict[int, "asyncio.Queue[_core.Frame]"] = {}
        self._closed: Optional[SessiondError] = None
        self._writer: Optional[asyncio.StreamWriter] = None
        self._reader_task: Optional["asyncio.Task[None]"] = None

    @classmethod
    async def connect(
        cls,
        path: Optional[_core.PathLike] = None,
        *,
        timeout: Optional[float] = None,
        retry: bool = False,
        max_retries: int = 5,
        insecure_socket_dir: bool = False,
    ) -> "AsyncClient":
        """A connected client."""
        client = cls(
            path, timeout=timeout, retry=retry, max_retries=max_retries, insecure_socket_dir=insecure_socket_dir
        )
        await client.open()
        return client

    async def open(self) -> None:
        """Connects (``async with`` does it)."""
        sock, self.path = _core.connect_socket(self._path_arg, self._insecure)
        reader, self._writer = await asyncio.open_unix_connection(sock=sock, limit=1 << 20)
        self._reader_task = asyncio.get_running_loop().create_task(self._read_loop(reader))

    async def close(self) -> None:
        """Closes the connection; calls still waiting get :class:`ConnectionClosed`."""
        if self._writer is not None:
            self._writer.close()
            try:
                await self._writer.wait_closed()
            except OSError:
                pass
        if self._reader_task is not None:
            try:
                await asyncio.wait_for(self._reader_task, 5)
            except (asyncio.TimeoutError, asyncio.CancelledError):
                self._reader_task.cancel()

    async def __aenter__(self) -> "AsyncClient":
        if self._writer is None:
            await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        await self.close()

    async def _read_loop(self, reader: asyncio.StreamReader) -> None:
        error: SessiondError = ConnectionClosed("the daemon closed the connection")
        try:
            while True:
                header = await reader.readexactly(_core.HEADER.size)
                (length,) = _core.HEADER.unpack(header)
                body = await reader.readexactly(length)
                frame = _core.sort_frame(body)
                if frame is None:
                    continue
                if frame.id is None:
                    # A nil id is about the connection; INVALID_REQUEST leaves it open.
                    if frame.error is not None and frame.error.code != "INVALID_REQUEST":
                        error = frame.error
                        break
                    continue
                call = self._calls.get(frame.id)
                if call is not None:
                    if frame.final:
                        del self._calls[frame.id]
                    call.put_nowait(frame)
        except asyncio.IncompleteReadError:
            pass
        except OSError as e:
            error = ConnectionClosed(f"connection error: {e}")
        self._closed = error
        calls = list(self._calls.items())
        self._calls.clear()
        for call_id, call in calls:
            call.put_nowait(_core.Frame(call_id, error=error))

    async def _send(self, method: str, params: Optional[Mapping[str, Any]]) -> Tuple[int, "asyncio.Queue[_core.Frame]"]:
        if self._writer is None:
            raise ConnectionClosed("not connected: use `await AsyncClient.connect()` or `async with`")
        if self._closed is not None:
            raise self._closed
        call_id = next(self._ids) % _core.MAX_ID
        call: "asyncio.Queue[_core.Frame]" = asyncio.Queue()
        self._calls[call_id] = call
        try:
            self._writer.write(_core.encode_request(call_id, method, params))
            await self._writer.drain()
        except OSError as e:
            try:
                frame = await asyncio.wait_for(call.get(), 1.0)
                if frame.error is not None:
                    raise frame.error from e
            except asyncio.TimeoutError:
                pass
            self._calls.pop(call_id, None)
            raise ConnectionClosed(f"cannot send: {e}") from e
        return call_id, call

    def _forget(self, call_id: int) -> None:
        self._calls.pop(call_id, None)

    async def _next_frame(self, call_id: int, call: "asyncio.Queue[_core.Frame]", deadline: _Deadline) -> _core.Frame:
        try:
            return await asyncio.wait_for(call.get(), deadline.left())
        except asyncio.TimeoutError:
            self._forget(call_id)
            raise CallTimeout(f"no answer within {deadline.timeout}s") from None

    def _deadline(self, timeout: Optional[float], extra: float = 0.0) -> _Deadline:
        t = self.timeout if timeout is None else timeout
        return _Deadline(None if t is None else t + extra)

    async def _retrying(self, error: SessiondError, attempt: int, deadline: _Deadline) -> bool:
        if not self.retry or error.code not in RETRYABLE_CODES or attempt >= self.max_retries:
            return False
        delay = _core.retry_delay(error, attempt)
        left = deadline.left()
        if left is not None and delay > left:
            return False
        await asyncio.sleep(delay)
        return True

    async def call(
        self,
        method: str,
        params: Optional[Mapping[str, Any]] = None,
        *,
        timeout: Optional[float] = None,
        _extra_timeout: float = 0.0,
    ) -> Any:
        """Calls ``method`` and returns its raw ``result``."""
        deadline = self._deadline(timeout, _extra_timeout)
        for attempt in itertools.count():
            call_id, call = await self._send(method, params)
            while True:
                frame = await self._next_frame(call_id, call, deadline)
                if frame.final:
                    break
            if frame.error is None:
                return frame.result
            if not await self._retrying(frame.error, attempt, deadline):
                raise frame.error
        raise AssertionError("unreachable")

    async def ping(self, *, timeout: Optional[float] = None) -> PingResult:
        """``system.ping``."""
        return PingResult.from_wire(await self.call("system.ping", timeout=timeout))

    async def stats(self, *, timeout: Optional[float] = None) -> StatsResult:
        """``system.stats``."""
        return StatsResult.from_wire(await self.call("system.stats", timeout=timeout))

    async def create_session(
        self,
        *,
        cwd: Optional[str] = None,
        env: Optional[Mapping[str, str]] = None,
        limits: Optional[Mapping[str, Any]] = None,
        init: Optional[str] = None,
        timeout: Optional[float] = None,
    ) -> "AsyncSession":
        """``session.create``: an :class:`AsyncSession` (``async with`` destroys it on exit)."""
        result = await self.call(
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
        return AsyncSession(self, result["session_id"])

    def session(self, **kwargs: Any) -> "_SessionContext":
        """``async with client.session() as s:`` creates a session and destroys it on exit."""
        return _SessionContext(self, kwargs)

    async def destroy_session(self, session_id: str, *, timeout: Optional[float] = None) -> bool:
        """``session.destroy``."""
        result = await self.call("session.destroy", {"session_id": session_id}, timeout=timeout)
        return bool(result.get("destroyed")) if isinstance(result, Mapping) else False

    async def list_sessions(self, *, timeout: Optional[float] = None) -> List[SessionInfo]:
        """``session.list``: this uid's sessions, oldest first."""
        result = await self.call("session.list", timeout=timeout)
        sessions = result.get("sessions") if isinstance(result, Mapping) else None
        return [SessionInfo.from_wire(s) for s in sessions] if isinstance(sessions, list) else []

    async def run(
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
        on_stdout: Optional[AsyncOutputCallback] = None,
        on_stderr: Optional[AsyncOutputCallback] = None,
        timeout: Optional[float] = None,
    ) -> ExecResult:
        """``exec.run`` (see :meth:`sessiond.Client.run`); callbacks may be coroutine functions."""
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
            return ExecResult.from_wire(await self.call("exec.run", p, timeout=timeout))
        stream = await self.stream_params(p, timeout=timeout)
        async for event in stream:
            callback = on_stdout if event.stream == "stdout" else on_stderr
            if callback is not None and event.stream in ("stdout", "stderr"):
                outcome = callback(event.data)
                if inspect.isawaitable(outcome):
                    await outcome
        return await stream.wait()

    async def stream(
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
    ) -> "AsyncExecStream":
        """``exec.run`` with ``stream: true``: ``async for`` over the :class:`AsyncExecStream`."""
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
        return await self.stream_params(p, timeout=timeout)

    async def stream_params(self, params: Mapping[str, Any], *, timeout: Optional[float] = None) -> "AsyncExecStream":
        """A streaming ``exec.run`` of ready-made params."""
        p = dict(params, stream=True)
        call_id, call = await self._send("exec.run", p)
        return AsyncExecStream(self, p, self._deadline(timeout), call_id, call)

    async def start(
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
    ) -> "AsyncCommandHandle":
        """``exec.start``: an :class:`AsyncCommandHandle` as soon as the command runs."""
        result = await self.call(
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
        return AsyncCommandHandle(self, result["command_id"])

    def attach(self, command_id: str, *, stdout_offset: int = 0, stderr_offset: int = 0) -> "AsyncCommandHandle":
        """An :class:`AsyncCommandHandle` for a command started earlier (by any connection of this uid)."""
        return AsyncCommandHandle(self, command_id, stdout_offset=stdout_offset, stderr_offset=stderr_offset)

    async def read(
        self,
        command_id: str,
        *,
        stdout_offset: int = 0,
        stderr_offset: int = 0,
        wait_s: float = 0,
        timeout: Optional[float] = None,
    ) -> ReadResult:
        """``exec.read``. The call's timeout is extended by ``wait_s``."""
        result = await self.call(
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

    async def write(
        self,
        command_id: str,
        data: Union[bytes, str] = b"",
        *,
        eof: bool = False,
        timeout: Optional[float] = None,
    ) -> int:
        """``exec.write``: how many bytes of ``data`` the command's stdin took."""
        result = await self.call(
            "exec.write",
            _core.params(command_id=command_id, data=data, eof=eof or None),
            timeout=timeout,
        )
        written = result.get("written") if isinstance(result, Mapping) else None
        return written if isinstance(written, int) else 0

    async def resize(self, command_id: str, rows: int, cols: int, *, timeout: Optional[float] = None) -> bool:
        """``exec.resize``: the new window size of a command's pseudo-terminal (started
        with ``pty=``); the command's foreground process group gets SIGWINCH."""
        result = await self.call(
            "exec.resize",
            {"command_id": command_id, "rows": int(rows), "cols": int(cols)},
            timeout=timeout,
        )
        return bool(result.get("resized")) if isinstance(result, Mapping) else False

    async def cancel(
        self,
        session_id: Optional[str] = None,
        *,
        command_id: Optional[str] = None,
        timeout: Optional[float] = None,
    ) -> bool:
        """``exec.cancel`` by ``session_id`` or by ``command_id``: ``cancelled``."""
        if (session_id is None) == (command_id is None):
            raise ValueError("give exactly one of session_id and command_id")
        result = await self.call(
            "exec.cancel", _core.params(session_id=session_id, command_id=command_id), timeout=timeout
        )
        return bool(result.get("cancelled")) if isinstance(result, Mapping) else False


class AsyncSession:
    """A session of an :class:`AsyncClient`; ``async with`` destroys it on exit."""

    def __init__(self, client: AsyncClient, session_id: str) -> None:
        self.client = client
        self.session_id = session_id

    def __repr__(self) -> str:
        return f"AsyncSession({self.session_id!r})"

    async def __aenter__(self) -> "AsyncSession":
        return self

    async def __aexit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        await self.destroy(missing_ok=True)

    async def destroy(self, *, missing_ok: bool = False, timeout: Optional[float] = None) -> bool:
        """``session.destroy``; with ``missing_ok`` a session already gone is not an error."""
        try:
            return await self.client.destroy_session(self.session_id, timeout=timeout)
        except SessionNotFound:
            if missing_ok:
                return False
            raise

    async def run(self, command: str, **kwargs: Any) -> ExecResult:
        """:meth:`AsyncClient.run` in this session."""
        return await self.client.run(self.session_id, command, **kwargs)

    async def stream(self, command: str, **kwargs: Any) -> "AsyncExecStream":
        """:meth:`AsyncClient.stream` in this session."""
        return await self.client.stream(self.session_id, command, **kwargs)

    async def start(self, command: str, **kwargs: Any) -> "AsyncCommandHandle":
        """:meth:`AsyncClient.start` in this session."""
        return await self.client.start(self.session_id, command, **kwargs)

    async def cancel(self, *, timeout: Optional[float] = None) -> bool:
        """``exec.cancel`` of every command the session runs."""
        return await self.client.cancel(self.session_id, timeout=timeout)


class _SessionContext:
    """``async with client.session(...)``: creates on enter, destroys on exit."""

    def __init__(self, client: AsyncClient, kwargs: Dict[str, Any]) -> None:
        self._client = client
        self._kwargs = kwargs
        self._session: Optional[AsyncSession] = None

    async def __aenter__(self) -> AsyncSession:
        self._session = await self._client.create_session(**self._kwargs)
        return self._session

    async def __aexit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        if self._session is not None:
            await self._session.destroy(missing_ok=True)


class AsyncExecStream:
    """A streaming ``exec.run``: ``async for`` its :class:`OutputEvent`\\ s, then :meth:`wait`."""

    def __init__(
        self,
        client: AsyncClient,
        params: Dict[str, Any],
        deadline: _Deadline,
        call_id: int,
        call: "asyncio.Queue[_core.Frame]",
    ) -> None:
        self.client = client
        self.command_id: Optional[str] = None
        self._params = params
        self._deadline = deadline
        self._call_id, self._call = call_id, call
        self._result: Optional[ExecResult] = None
        self._attempt = 0
        self._early: List[OutputEvent] = []

    def close(self) -> None:
        """Stops listening (the command is not cancelled)."""
        self.client._forget(self._call_id)

    async def __aenter__(self) -> "AsyncExecStream":
        return self

    async def __aexit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        self.close()

    async def _pump(self) -> Optional[OutputEvent]:
        frame = await self.client._next_frame(self._call_id, self._call, self._deadline)
        if frame.event is not None:
            event = _event(frame.event)
            if isinstance(event, str):
                self.command_id = event
                return None
            return event
        if frame.error is not None:
            if self.command_id is None and await self.client._retrying(frame.error, self._attempt, self._deadline):
                self._attempt += 1
                self._call_id, self._call = await self.client._send("exec.run", self._params)
                return None
            raise frame.error
        self._result = ExecResult.from_wire(frame.result)
        return None

    async def started(self) -> str:
        """Waits for the ``started`` event and returns the command id."""
        while self.command_id is None and self._result is None:
            event = await self._pump()
            if event is not None:
                self._early.append(event)
        if self.command_id is None:
            raise ProtocolError("the command ended without a `started` event")
        return self.command_id

    async def __aiter__(self) -> AsyncIterator[OutputEvent]:
        while self._early:
            yield self._early.pop(0)
        while self._result is None:
            event = await self._pump()
            if event is not None:
                yield event

    async def wait(self) -> ExecResult:
        """The result (events not yet iterated are dropped)."""
        async for _ in self:
            pass
        assert self._result is not None
        return self._result

    async def write(self, data: Union[bytes, str] = b"", *, eof: bool = False) -> int:
        """``exec.write`` to this command (started with ``stdin_open=True``)."""
        return await self.client.write(await self.started(), data, eof=eof)

    async def resize(self, rows: int, cols: int) -> bool:
        """``exec.resize`` of this command's pseudo-terminal (started with ``pty=``)."""
        return await self.client.resize(await self.started(), rows, cols)


class AsyncCommandHandle:
    """A command by its id; see :class:`sessiond.CommandHandle`."""

    def __init__(
        self, client: AsyncClient, command_id: str, *, stdout_offset: int = 0, stderr_offset: int = 0
    ) -> None:
        self.client = client
        self.command_id = command_id
        self.stdout_next = stdout_offset
        self.stderr_next = stderr_offset
        self._stdout = bytearray()
        self._stderr = bytearray()

    def __repr__(self) -> str:
        return f"AsyncCommandHandle({self.command_id!r})"

    async def read(self, wait_s: float = 0, *, timeout: Optional[float] = None) -> ReadResult:
        """``exec.read`` from where this handle stopped; moves its offsets on."""
        r = await self.client.read(
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

    async def write(self, data: Union[bytes, str], *, eof: bool = False, timeout: Optional[float] = None) -> int:
        """``exec.write``."""
        return await self.client.write(self.command_id, data, eof=eof, timeout=timeout)

    async def close_stdin(self, *, timeout: Optional[float] = None) -> None:
        """``exec.write`` with ``eof``."""
        await self.client.write(self.command_id, b"", eof=True, timeout=timeout)

    async def resize(self, rows: int, cols: int, *, timeout: Optional[float] = None) -> bool:
        """``exec.resize`` of this command's pseudo-terminal (started with ``pty=``)."""
        return await self.client.resize(self.command_id, rows, cols, timeout=timeout)

    async def cancel(self, *, timeout: Optional[float] = None) -> bool:
        """``exec.cancel`` by command id."""
        return await self.client.cancel(command_id=self.command_id, timeout=timeout)

    async def wait(self, timeout: Optional[float] = None) -> ExecResult:
        """Reads to the end; see :meth:`sessiond.CommandHandle.wait`."""
        deadline = _Deadline(timeout)
        while True:
            left = deadline.left()
            if left is not None and left <= 0:
                raise CallTimeout(f"the command did not end within {timeout}s")
            wait_s = _core.MAX_WAIT_S if left is None else max(0.001, min(_core.MAX_WAIT_S, left))
            r = await self.read(wait_s)
            if r.done and not r.stdout and not r.stderr:
                if r.result is None:
                    raise ProtocolError("exec.read: done without a result")
                return dataclasses.replace(r.result, stdout=bytes(self._stdout), stderr=bytes(self._stderr))

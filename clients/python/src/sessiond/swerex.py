"""SWE-ReX's ``AbstractRuntime`` on sessiond: ``runtime = SessiondRuntime()``.

Needs the optional dependency: ``pip install sessiond[swerex]`` (SWE-ReX 1.4).
Every method is a request to the daemon over its socket; nothing here touches
the filesystem or runs a process with the Python process's own rights. A
SWE-ReX session is a sessiond session (its terminal state — cwd, variables
exported or not, functions, aliases, options — is carried by the daemon); the
one-off commands of ``execute`` and the file operations run in helper sessions
created with the same ``cwd``, ``env`` and ``limits``, so they have exactly the
rights and limits of the session's own commands. See docs/swerex.md.
"""

from __future__ import annotations

import asyncio
import codecs
import errno
import logging
import os
import queue
import re
import shlex
import socket as _socket
import tarfile
import threading
from contextlib import asynccontextmanager
from pathlib import Path
from typing import IO, Any, AsyncIterator, Dict, List, Mapping, Optional, Tuple, Union

from swerex.deployment.abstract import AbstractDeployment
from swerex.deployment.hooks.abstract import CombinedDeploymentHook, DeploymentHook
from swerex.exceptions import (
    BashIncorrectSyntaxError,
    CommandTimeoutError,
    DeploymentNotStartedError,
    NonZeroExitCodeError,
    SessionDoesNotExistError,
    SessionExistsError,
    SwerexException,
)
from swerex.runtime.abstract import (
    AbstractRuntime,
    Action,
    BashAction,
    BashInterruptAction,
    BashObservation,
    CloseBashSessionResponse,
    CloseResponse,
    CloseSessionRequest,
    CloseSessionResponse,
    Command,
    CommandResponse,
    CreateBashSessionResponse,
    CreateSessionRequest,
    CreateSessionResponse,
    IsAliveResponse,
    Observation,
    ReadFileRequest,
    ReadFileResponse,
    UploadRequest,
    UploadResponse,
    WriteFileRequest,
    WriteFileResponse,
)

from ._core import PathLike
from .aio import AsyncClient
from .errors import CommandNotFound, InvalidRequest, SessiondError, SessionNotFound
from .types import ExecResult

__all__ = ["SessiondRuntime", "SessiondDeployment"]

#: Bytes per ``exec.write`` of an upload or a large ``write_file`` (under the
#: daemon's default ``commands.max_stdin_bytes`` of 1 MiB).
WRITE_CHUNK = 256 * 1024
#: Bytes asked for per command by ``read_file`` (under the default
#: ``commands.max_output_bytes`` of 4 MiB; a smaller cap is detected and followed).
READ_CHUNK = 4 * 1024 * 1024
#: Helper sessions kept for ``execute`` and file operations when idle (they
#: count in the daemon's ``sessions.max_sessions_per_client``, 8 by default).
MAX_IDLE_HELPERS = 1
#: Messages of file commands are matched to an ``OSError`` class: ask for English.
_C_LOCALE = {"LC_ALL": "C"}

# What SWE-ReX strips from a terminal's output (swerex.runtime.local._strip_control_chars).
_ANSI_ESCAPE = re.compile(r"\x1B[@-_][0-?]*[ -/]*[@-~]")
# Bash's own parse errors for a `bash -c` string (the command never ran).
_SYNTAX_ERROR = re.compile(r"^bash: (-c: )?line \d+: (syntax error|unexpected EOF)", re.MULTILINE)


def _strip_control_chars(s: str) -> str:
    return _ANSI_ESCAPE.sub("", s).replace("\r\n", "\n")


def _decode(b: bytes) -> str:
    # pexpect decodes the terminal with codec_errors="backslashreplace"; so do we.
    return b.decode("utf-8", errors="backslashreplace")


def _is_blank(command: str) -> bool:
    """Empty, white space or comments only (SWE-ReX sends nothing for these)."""
    return all(not line.strip() or line.strip().startswith("#") for line in command.splitlines())


def _session_script(command: str) -> str:
    """The command as a session runs it.

    A brace group makes bash parse the whole command before it runs any of it,
    so a syntax error anywhere runs nothing (as SWE-ReX's ``bash -n`` check
    does) at no extra cost; its ``2>&1`` interleaves stderr into the output as
    a terminal does, and leaves on the real stderr only what bash's parser
    says: that is how a syntax error is told from a command that failed. The
    group runs in the session's shell itself, so the state it leaves is kept.
    """
    if _is_blank(command):
        # `{ }` would be a syntax error; bash runs a blank string as is ($? kept).
        return command
    return "{ " + command + "\n} 2>&1"


def _execute_script(command: Command) -> str:
    """A one-off command as a subshell: no state leaks into the helper session."""
    if isinstance(command.command, str):
        argv: List[str] = [command.command]
    else:
        argv = list(command.command)
    if command.shell:
        # subprocess semantics: the first item is the script, the rest $0, $1...
        script = argv[0] if argv else ""
        if len(argv) > 2:
            script = f"set -- {shlex.join(argv[2:])}\n{script}"
    else:
        script = "exec " + shlex.join(argv)
    cd = f"cd -- {shlex.quote(command.cwd)} || exit; " if command.cwd else ""
    # `:;` keeps a blank script valid; the script starts on line 1.
    wrapped = f"(:; {cd}{script}\n)"
    return wrapped + (" 2>&1" if command.merge_output_streams else "")


def _os_error(what: str, path: str, result: ExecResult) -> OSError:
    """An ``OSError`` of the class ``pathlib`` would have raised, from a command's stderr."""
    message = _decode(result.stderr).strip() or _decode(result.stdout).strip()
    for text, code in (
        ("No such file or directory", errno.ENOENT),
        ("Permission denied", errno.EACCES),
        ("Is a directory", errno.EISDIR),
        ("Not a directory", errno.ENOTDIR),
        ("File exists", errno.EEXIST),
        ("No space left on device", errno.ENOSPC),
        ("Read-only file system", errno.EROFS),
    ):
        if text in message:
            return OSError(code, f"{what}: {message}", path)
    return OSError(f"{what} {path!r} failed (exit {result.exit_code}, killed_by {result.killed_by}): {message}")


def _expect_first(patterns: List[str], text: str) -> Optional[Tuple[int, "re.Match[str]"]]:
    """As pexpect: the pattern that matches earliest in ``text`` (the lowest index on a tie)."""
    best: Optional[Tuple[int, "re.Match[str]"]] = None
    for i, pattern in enumerate(patterns):
        m = re.search(pattern, text, re.DOTALL)
        if m is not None and (best is None or m.start() < best[1].start()):
            best = (i, m)
    return best


class _Interactive:
    """A program started with ``is_interactive_command``, on a pseudo-terminal."""

    def __init__(self, command_id: str) -> None:
        self.command_id = command_id
        self.offset = 0
        self.buffer = ""
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="backslashreplace")
        self.done = False


class _Named:
    """A SWE-ReX session: its sessiond session and the interactive program it runs, if any."""

    def __init__(self, session_id: str) -> None:
        self.session_id = session_id
        self.interactive: Optional[_Interactive] = None


class SessiondRuntime(AbstractRuntime):
    """SWE-ReX's runtime interface, served by a sessiond daemon.

    ``socket`` is the daemon's socket (default: as :class:`sessiond.Client`
    finds it). ``cwd``, ``env`` and ``limits`` are those of
    ``session.create`` for every session this runtime makes. ``pty_size`` is
    the (rows, cols) of interactive programs' terminals, and
    ``interactive_timeout_s`` the daemon timeout they run under (at most the
    daemon's ``commands.max_timeout``). A command with ``timeout=None`` gets
    ``default_timeout_s``, else the daemon's default timeout; a command of a
    file operation gets ``file_timeout_s``, else that default.
    """

    def __init__(
        self,
        socket: Optional[PathLike] = None,
        *,
        cwd: Optional[str] = None,
        env: Optional[Mapping[str, str]] = None,
        limits: Optional[Mapping[str, Any]] = None,
        default_timeout_s: Optional[float] = None,
        file_timeout_s: Optional[float] = None,
        interactive_timeout_s: float = 3600.0,
        pty_size: Tuple[int, int] = (24, 80),
        max_retries: int = 5,
        insecure_socket_dir: bool = False,
        logger: Optional[logging.Logger] = None,
    ) -> None:
        self.socket = socket
        self.logger = logger or logging.getLogger("sessiond.swerex")
        self._create: Dict[str, Any] = {
            "cwd": cwd,
            "env": dict(env) if env is not None else None,
            "limits": dict(limits) if limits is not None else None,
        }
        self.default_timeout_s = default_timeout_s
        self.file_timeout_s = file_timeout_s
        self.interactive_timeout_s = interactive_timeout_s
        self.pty_size = pty_size
        self._max_retries = max_retries
        self._insecure = insecure_socket_dir
        self._sessions: Dict[str, _Named] = {}
        self._helpers: List[str] = []
        # One connection per event loop: SWE-agent runs each call in asyncio.run().
        self._aclient: Optional[AsyncClient] = None
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._has_pty: Optional[bool] = None

    # -- the connection --------------------------------------------------------

    async def _client(self) -> AsyncClient:
        loop = asyncio.get_running_loop()
        if self._aclient is not None and self._loop is loop and self._aclient._closed is None:
            return self._aclient
        if self._aclient is not None and self._loop is not None:
            _abandon(self._aclient, self._loop)
        # Sessions belong to the uid, not to the connection: the new one finds them all.
        self._aclient = await AsyncClient.connect(
            self.socket, retry=True, max_retries=self._max_retries, insecure_socket_dir=self._insecure
        )
        self._loop = loop
        return self._aclient

    async def _new_session(self) -> str:
        client = await self._client()
        return (await client.create_session(**self._create)).session_id

    async def _destroy(self, session_id: str) -> None:
        try:
            await (await self._client()).destroy_session(session_id)
        except SessionNotFound:
            pass

    @asynccontextmanager
    async def _helper(self) -> AsyncIterator[str]:
        """A helper session for one one-off command or file operation at a time."""
        session_id = self._helpers.pop() if self._helpers else await self._new_session()
        try:
            yield session_id
        except SessionNotFound:
            raise
        except BaseException:
            # Cut short (cancelled, connection lost): it may still run what it
            # was given, so it is not handed out again. The original error is
            # the one to raise, whatever the destroy meets.
            try:
                await asyncio.shield(self._destroy(session_id))
            except Exception:  # noqa: BLE001
                self.logger.warning("could not destroy helper session %s", session_id)
            raise
        if len(self._helpers) < MAX_IDLE_HELPERS:
            self._helpers.append(session_id)
        else:
            await self._destroy(session_id)

    async def _helper_run(self, command: str, **kwargs: Any) -> ExecResult:
        """``exec.run`` in a helper session; one more try if the helper had expired."""
        for attempt in (0, 1):
            try:
                async with self._helper() as session_id:
                    return await (await self._client()).run(session_id, command, **kwargs)
            except SessionNotFound:
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def _named(self, name: str) -> _Named:
        named = self._sessions.get(name)
        if named is None:
            raise SessionDoesNotExistError(f"session {name!r} does not exist")
        return named

    def _lost(self, name: str, e: SessiondError) -> SessionDoesNotExistError:
        self._sessions.pop(name, None)
        return SessionDoesNotExistError(f"session {name!r} is gone from the daemon (expired or destroyed): {e}")

    def _timeout(self, timeout: Optional[float]) -> Optional[float]:
        return self.default_timeout_s if timeout is None else timeout

    # -- AbstractRuntime -------------------------------------------------------

    async def is_alive(self, *, timeout: Optional[float] = None) -> IsAliveResponse:
        """``system.ping``."""
        try:
            await (await self._client()).ping(timeout=timeout if timeout is not None else 10.0)
        except Exception as e:  # noqa: BLE001 - any failure means "not alive", as in SWE-ReX
            return IsAliveResponse(is_alive=False, message=f"sessiond at {self.socket or 'default socket'}: {e}")
        return IsAliveResponse(is_alive=True)

    async def create_session(self, request: CreateSessionRequest) -> CreateSessionResponse:
        """A sessiond session under ``request.session``; ``startup_source`` files are sourced in it."""
        if request.session in self._sessions:
            raise SessionExistsError(f"session {request.session} already exists")
        session_id = await self._new_session()
        output = ""
        if request.startup_source:
            script = "\n".join(f"source {shlex.quote(path)}" for path in request.startup_source)
            try:
                r = await (await self._client()).run(
                    session_id, _session_script(script), timeout_s=request.startup_timeout
                )
            except BaseException:
                await asyncio.shield(self._destroy(session_id))
                raise
            if r.timed_out:
                await self._destroy(session_id)
                raise CommandTimeoutError(
                    f"timeout after {request.startup_timeout} seconds while sourcing {request.startup_source}"
                )
            output = _strip_control_chars(_decode(r.stdout) + _decode(r.stderr))
        self._sessions[request.session] = _Named(session_id)
        return CreateBashSessionResponse(output=output)

    async def run_in_session(self, action: Action) -> Observation:
        """A command in the named session, with SWE-ReX's semantics (docs/swerex.md)."""
        named = self._named(action.session)
        try:
            if isinstance(action, BashInterruptAction):
                return await self._interrupt(named, action)
            if action.is_interactive_command or action.is_interactive_quit or named.interactive is not None:
                return await self._run_interactive(named, action)
            return await self._run_normal(named, action)
        except SessionNotFound as e:
            raise self._lost(action.session, e) from None

    async def _run_normal(self, named: _Named, action: BashAction) -> BashObservation:
        client = await self._client()
        try:
            r = await client.run(
                named.session_id, _session_script(action.command), timeout_s=self._timeout(action.timeout)
            )
        except asyncio.CancelledError:
            # The caller gave up (asyncio.wait_for, shutdown): stop the command
            # too, or the session would stay busy with it.
            try:
                await self._stop_commands(named.session_id)
            except Exception:  # noqa: BLE001 - the cancellation is what matters
                pass
            raise
        if r.timed_out:
            raise CommandTimeoutError(
                f"timeout after {action.timeout} seconds while running command {action.command!r}"
            )
        output = _strip_control_chars(_decode(r.stdout))
        stderr = _decode(r.stderr)
        if r.exit_code == 2 and not r.stdout and _SYNTAX_ERROR.search(stderr):
            raise await self._syntax_error(action.command)
        if stderr:
            # Nothing the command itself writes lands here (its stderr is in
            # the output); keep whatever did, e.g. a warning of the daemon.
            output += _strip_control_chars(stderr)
        failure_reason = ""
        exit_code = r.exit_code
        if r.killed_by is not None:
            failure_reason = f"killed by sessiond: {r.killed_by}"
        if exit_code is None and r.signal is not None:
            exit_code = 128 + r.signal  # what the shell would show as $?
        if r.stdout_truncated:
            dropped = r.stdout_total_bytes - len(r.stdout)
            failure_reason = "; ".join(
                x for x in (failure_reason, f"output truncated: {dropped} bytes dropped by the daemon's cap") if x
            )
        if action.check == "ignore":
            return BashObservation(output=output, exit_code=None, failure_reason=failure_reason)
        if action.check == "raise" and exit_code != 0:
            msg = f"Command {action.command!r} failed with exit code {exit_code}. Here is the output:\n{output!r}"
            if action.error_msg:
                msg = f"{action.error_msg}: {msg}"
            raise NonZeroExitCodeError(msg)
        return BashObservation(output=output, exit_code=exit_code, failure_reason=failure_reason)

    async def _syntax_error(self, command: str) -> BashIncorrectSyntaxError:
        """SWE-ReX's error, with the message of its own ``bash -n`` check.

        Only on this path is the command checked again, by ``bash -n`` in a
        helper session, so that the message names the user's lines rather
        than the brace group around them.
        """
        r = await self._helper_run("bash -n", stdin=command.encode(), env=_C_LOCALE)
        stdout, stderr = _decode(r.stdout), _decode(r.stderr)
        msg = (
            f"Error (exit code {r.exit_code}) while checking bash command \n{command!r}\n"
            f"---- Stderr ----\n{stderr}\n---- Stdout ----\n{stdout}"
        )
        return BashIncorrectSyntaxError(msg, extra_info={"bash_stdout": stdout, "bash_stderr": stderr})

    async def _read_until(
        self, inter: _Interactive, patterns: List[str], timeout: Optional[float]
    ) -> Tuple[str, str]:
        """Reads the program's terminal until a pattern matches (or it ends).

        Returns the text before the match and the pattern; what follows the
        match stays buffered for the next read, as with pexpect.
        """
        client = await self._client()
        loop = asyncio.get_running_loop()
        end = None if timeout is None else loop.time() + timeout
        while True:
            found = _expect_first(patterns, inter.buffer)
            if found is not None:
                i, m = found
                before, inter.buffer = inter.buffer[: m.start()], inter.buffer[m.end() :]
                return before, patterns[i]
            if inter.done:
                before, inter.buffer = inter.buffer, ""
                return before, ""
            left = None if end is None else end - loop.time()
            if left is not None and left <= 0:
                raise CommandTimeoutError(f"timeout after {timeout} seconds waiting for {patterns}")
            r = await client.read(
                inter.command_id, stdout_offset=inter.offset, wait_s=min(left, 30.0) if left is not None else 30.0
            )
            inter.offset = r.stdout_next
            inter.buffer += inter.decoder.decode(r.stdout, final=r.done)
            if r.done and not r.stdout:
                inter.done = True

    async def _run_interactive(self, named: _Named, action: BashAction) -> BashObservation:
        client = await self._client()
        inter = named.interactive
        if inter is None:
            if action.is_interactive_quit:
                raise SessionDoesNotExistError(f"no interactive program runs in session {action.session!r}")
            if self._has_pty is None:
                self._has_pty = "pty" in (await client.ping()).features
            if not self._has_pty:
                # An older daemon ignores the `pty` param: the program would
                # run on pipes and never show its prompt.
                raise SwerexException(
                    "interactive commands need a sessiond with pseudo-terminals (`pty` in system.ping's features)"
                )
            # The program itself is the command, on a terminal of its own; the
            # session's slot is its until it ends.
            h = await client.start(
                named.session_id,
                action.command,
                pty=self.pty_size,
                stdin_open=True,
                timeout_s=self.interactive_timeout_s,
            )
            inter = named.interactive = _Interactive(h.command_id)
        else:
            # As typed at the program's prompt (pexpect's sendline).
            await self._write_all(inter.command_id, (action.command + "\n").encode())
        try:
            before, matched = await self._read_until(inter, list(action.expect), action.timeout)
        finally:
            if inter.done:
                named.interactive = None
        output = _strip_control_chars(before)
        if action.is_interactive_quit:
            if not inter.done:
                # The program was asked to quit: wait for it to be gone.
                await self._read_until(inter, [], action.timeout)
            named.interactive = None
        else:
            output = output.lstrip().removeprefix(action.command).strip()
        return BashObservation(output=output, exit_code=0, expect_string=matched)

    async def _stop_commands(self, session_id: str) -> None:
        """Cancels what the session runs and waits for it to have ended, so the
        session takes the next command (a cancel is answered before the kill)."""
        client = await self._client()
        running = [i.command_ids for i in await client.list_sessions() if i.session_id == session_id]
        for command_id in running[0] if running else []:
            try:
                await client.cancel(command_id=command_id)
                # Offsets past any output: the read answers when the command ends.
                while not (await client.read(command_id, stdout_offset=1 << 62, stderr_offset=1 << 62, wait_s=30)).done:
                    pass
            except CommandNotFound:
                pass  # ended and no longer retained

    async def _write_all(self, command_id: str, data: bytes) -> None:
        client = await self._client()
        view = memoryview(data)
        while view:
            written = await client.write(command_id, bytes(view[:WRITE_CHUNK]))
            view = view[written:]

    async def _interrupt(self, named: _Named, action: BashInterruptAction) -> BashObservation:
        client = await self._client()
        inter = named.interactive
        if inter is None:
            # A command of this session that another task still waits on: kill it.
            await self._stop_commands(named.session_id)
            return BashObservation(output="", exit_code=0)
        output = ""
        for _ in range(action.n_retry):
            try:
                await client.write(inter.command_id, b"\x03")  # Ctrl-C, as a keystroke
            except InvalidRequest:
                inter.done = True  # it has ended
            try:
                before, matched = await self._read_until(inter, list(action.expect), action.timeout)
            except CommandTimeoutError:
                continue
            if inter.done:
                named.interactive = None
            output += _strip_control_chars(before)
            return BashObservation(output=output.strip(), exit_code=0, expect_string=matched)
        # It ignores Ctrl-C: kill it (SWE-ReX's Ctrl-Z and `kill -9 %1`).
        await client.cancel(command_id=inter.command_id)
        before, matched = await self._read_until(inter, [], None)
        named.interactive = None
        return BashObservation(output=_strip_control_chars(before).strip(), exit_code=0, expect_string=matched)

    async def close_session(self, request: CloseSessionRequest) -> CloseSessionResponse:
        """``session.destroy`` (its processes, background ones too, are killed)."""
        named = self._named(request.session)
        del self._sessions[request.session]
        await self._destroy(named.session_id)
        return CloseBashSessionResponse()

    async def execute(self, command: Command) -> CommandResponse:
        """A one-off command, in a subshell of a helper session (``subprocess.run`` semantics)."""
        r = await self._helper_run(
            _execute_script(command), timeout_s=self._timeout(command.timeout), env=command.env
        )
        if r.timed_out:
            raise CommandTimeoutError(f"Timeout ({command.timeout}s) exceeded while running command")
        exit_code = r.exit_code if r.exit_code is not None else 128 + (r.signal or 0)
        response = CommandResponse(stdout=_decode(r.stdout), stderr=_decode(r.stderr), exit_code=exit_code)
        if command.check and exit_code != 0:
            msg = (
                f"Command {command.command!r} failed with exit code {exit_code}. "
                f"Stdout:\n{response.stdout!r}\nStderr:\n{response.stderr!r}"
            )
            if command.error_msg:
                msg = f"{command.error_msg}: {msg}"
            raise NonZeroExitCodeError(msg)
        return response

    async def read_file(self, request: ReadFileRequest) -> ReadFileResponse:
        """The file's text, read by commands of a helper session in bounded chunks."""
        path = shlex.quote(request.path)
        data = bytearray()
        chunk = READ_CHUNK
        while True:
            if not data:
                # The checks give pathlib's exception classes without a second round trip.
                script = (
                    f"[ -e {path} ] || {{ echo 'No such file or directory' >&2; exit 66; }}; "
                    f"[ -d {path} ] && {{ echo 'Is a directory' >&2; exit 66; }}; "
                    f"head -c {chunk} -- {path}"
                )
            else:
                script = f"tail -c +{len(data) + 1} -- {path} | head -c {chunk}"
            r = await self._helper_run(script, env=_C_LOCALE, timeout_s=self.file_timeout_s)
            if r.exit_code != 0:
                raise _os_error("read_file", request.path, r)
            data += r.stdout
            if r.stdout_truncated:
                chunk = len(r.stdout)  # the daemon's cap is lower: follow it
                if chunk == 0:
                    raise OSError(f"read_file {request.path!r}: the daemon returns no output")
            elif len(r.stdout) < chunk:
                break
        text = bytes(data).decode(request.encoding or "utf-8", errors=request.errors or "strict")
        # Path.read_text reads with universal newlines.
        return ReadFileResponse(content=text.replace("\r\n", "\n").replace("\r", "\n"))

    async def write_file(self, request: WriteFileRequest) -> WriteFileResponse:
        """Writes the file as the session's user, creating its parent directories (as SWE-ReX)."""
        await self._write_stream(request.path, [request.content.encode()], "write_file")
        return WriteFileResponse()

    async def _write_stream(self, target: str, chunks: Any, what: str, *, extract: bool = False) -> None:
        """Streams ``chunks`` (an iterable or async iterable of bytes) into ``cat >`` or ``tar -x``.

        The parent directories are made first (SWE-ReX's server does that for
        ``write_file`` and ``upload``). One ``exec.run`` with ``stdin`` when it
        all fits in one chunk, else one ``exec.start`` fed by ``exec.write``s
        of at most :data:`WRITE_CHUNK` bytes.
        """
        q = shlex.quote(target)
        if extract:
            script = f"mkdir -p -- {q} && tar -x --no-same-owner -f - -C {q}"
        else:
            script = f"mkdir -p -- \"$(dirname -- {q})\" && cat > {q}"
        it = chunks.__aiter__() if hasattr(chunks, "__aiter__") else _aiter(chunks)
        first = bytearray()
        ended = False
        while len(first) <= WRITE_CHUNK:
            try:
                first += await it.__anext__()
            except StopAsyncIteration:
                ended = True
                break
        if ended:
            r = await self._helper_run(script, stdin=bytes(first), env=_C_LOCALE, timeout_s=self.file_timeout_s)
        else:
            # Not retried on an expired helper: the chunks cannot be read twice.
            async with self._helper() as session_id:
                client = await self._client()
                h = await client.start(
                    session_id, script, stdin_open=True, env=_C_LOCALE, timeout_s=self.file_timeout_s
                )
                try:
                    await self._write_all(h.command_id, bytes(first))
                    async for piece in it:
                        await self._write_all(h.command_id, piece)
                    await h.close_stdin()
                except InvalidRequest:
                    pass  # the command ended early: its result says why
                r = await h.wait()
        if r.exit_code != 0:
            raise _os_error(what, target, r)

    async def upload(self, request: UploadRequest) -> UploadResponse:
        """A local file or directory, streamed to ``target_path`` by commands of a helper session.

        A directory goes as a tar stream made on the fly (bounded memory),
        extracted into ``target_path`` (merged with what is there, as SWE-ReX's
        server unzips into it).
        """
        source = Path(request.source_path).resolve()
        if source.is_dir():
            await self._write_stream(request.target_path, _tar_stream(source), "upload", extract=True)
        elif source.is_file():
            await self._write_stream(request.target_path, _file_stream(source), "upload")
        else:
            raise ValueError(f"Source path {source} is not a file or directory")
        return UploadResponse()

    async def close(self) -> CloseResponse:
        """Destroys every session this runtime made and closes its connection."""
        ids = [n.session_id for n in self._sessions.values()] + self._helpers
        self._sessions.clear()
        self._helpers = []
        try:
            for session_id in ids:
                await self._destroy(session_id)
        finally:
            # A connection of an event loop that has ended is left to the
            # collector: its loop can no longer close it.
            if self._aclient is not None and self._loop is asyncio.get_running_loop():
                await self._aclient.close()
        self._aclient = None
        self._loop = None
        return CloseResponse()


def _abandon(client: AsyncClient, loop: asyncio.AbstractEventLoop) -> None:
    """Closes the connection of an event loop this runtime no longer runs in.

    SWE-agent runs each call in its own ``asyncio.run()``: the loop that
    opened the connection has ended and can no longer close it, and left to
    the collector the socket would stay open — one more of the uid's
    ``max_connections_per_client`` held at the daemon per call.
    """
    if not loop.is_closed():
        asyncio.run_coroutine_threadsafe(client.close(), loop)
        return
    writer = client._writer
    # The transport's own socket: closing it twice is harmless, so its later
    # collection closes nothing else.
    raw = getattr(writer.get_extra_info("socket"), "_sock", None) if writer is not None else None
    if isinstance(raw, _socket.socket):
        raw.close()


async def _aiter(items: Any) -> AsyncIterator[bytes]:
    for item in items:
        yield item


async def _file_stream(path: Path) -> AsyncIterator[bytes]:
    """A local file in :data:`WRITE_CHUNK` pieces, read off the event loop."""
    loop = asyncio.get_running_loop()
    with open(path, "rb") as f:
        while True:
            piece = await loop.run_in_executor(None, f.read, WRITE_CHUNK)
            if not piece:
                return
            yield piece


class _QueueWriter:
    """A write-only file for ``tarfile``: pieces go to a bounded queue."""

    def __init__(self, q: "queue.Queue[Union[bytes, BaseException, None]]", stop: threading.Event) -> None:
        self._q = q
        self._stop = stop

    def write(self, data: bytes) -> int:
        if self._stop.is_set():
            raise OSError("upload abandoned")
        self._q.put(bytes(data))
        return len(data)


async def _tar_stream(source: Path) -> AsyncIterator[bytes]:
    """A tar of ``source``'s contents, made in a thread, at most a few chunks ahead."""
    q: "queue.Queue[Union[bytes, BaseException, None]]" = queue.Queue(maxsize=4)
    stop = threading.Event()

    def produce() -> None:
        try:
            writer: IO[bytes] = _QueueWriter(q, stop)  # type: ignore[assignment]
            with tarfile.open(fileobj=writer, mode="w|", bufsize=WRITE_CHUNK) as tar:
                for entry in sorted(os.listdir(source)):
                    tar.add(str(source / entry), arcname=entry)
            q.put(None)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            q.put(e)

    thread = threading.Thread(target=produce, name="sessiond-upload-tar", daemon=True)
    thread.start()
    loop = asyncio.get_running_loop()
    try:
        while True:
            item = await loop.run_in_executor(None, q.get)
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while thread.is_alive():
            try:
                q.get_nowait()  # unblock a producer waiting on a full queue
            except queue.Empty:
                await asyncio.sleep(0.01)


class SessiondDeployment(AbstractDeployment):
    """SWE-ReX's deployment interface around :class:`SessiondRuntime` (the daemon runs already).

    For code that takes an ``AbstractDeployment`` (SWE-agent's ``SWEEnv``):
    ``start()`` connects and checks the daemon answers, ``runtime`` is the
    runtime, ``stop()`` destroys its sessions. Takes the arguments of
    :class:`SessiondRuntime`.
    """

    def __init__(self, socket: Optional[PathLike] = None, *, logger: Optional[logging.Logger] = None, **kwargs: Any):
        self.logger = logger or logging.getLogger("sessiond.swerex")
        self._socket = socket
        self._kwargs = kwargs
        self._runtime: Optional[SessiondRuntime] = None
        self._hooks = CombinedDeploymentHook()

    def add_hook(self, hook: DeploymentHook) -> None:
        self._hooks.add_hook(hook)

    async def is_alive(self, *, timeout: Optional[float] = None) -> IsAliveResponse:
        if self._runtime is None:
            return IsAliveResponse(is_alive=False, message="Runtime is None.")
        return await self._runtime.is_alive(timeout=timeout)

    async def start(self, *args: Any, **kwargs: Any) -> None:
        runtime = SessiondRuntime(self._socket, logger=self.logger, **self._kwargs)
        alive = await runtime.is_alive()
        if not alive:
            # SWE-ReX leaves this __init__ unannotated (the rest of it is typed).
            raise DeploymentNotStartedError(alive.message)  # type: ignore[no-untyped-call]
        self._runtime = runtime

    async def stop(self, *args: Any, **kwargs: Any) -> None:
        if self._runtime is not None:
            runtime, self._runtime = self._runtime, None
            await runtime.close()

    @property
    def runtime(self) -> SessiondRuntime:
        if self._runtime is None:
            raise DeploymentNotStartedError()  # type: ignore[no-untyped-call]
        return self._runtime

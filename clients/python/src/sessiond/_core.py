"""What the sync and asyncio clients share: the socket path, connecting, framing, params."""

from __future__ import annotations

import errno
import os
import socket
import stat
import struct
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import msgpack

from .errors import (
    ConnectionClosed,
    ProtocolError,
    SessiondError,
    UnsafeSocketDir,
    error_from_wire,
)

#: The length prefix: 4 bytes, unsigned, big-endian.
HEADER = struct.Struct(">I")

#: Ids are unsigned and echoed back; wrap well below 2**64.
MAX_ID = 2**63

#: ``exec.read``'s largest ``wait_s``.
MAX_WAIT_S = 60.0

PathLike = Union[str, "os.PathLike[str]"]


def default_socket_path() -> str:
    """``$SESSIOND_SOCKET``, else ``$XDG_RUNTIME_DIR/sessiond.sock``, else ``/tmp/sessiond-<uid>/sessiond.sock``."""
    explicit = os.environ.get("SESSIOND_SOCKET")
    if explicit:
        return explicit
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return os.path.join(runtime, "sessiond.sock")
    return f"/tmp/sessiond-{os.getuid()}/sessiond.sock"


class ConnectFailed(ConnectionClosed):
    """No connection could be made to the socket (no daemon there, or not ours to enter)."""

    code = "CONNECT_FAILED"


def connect_socket(path: Optional[PathLike], insecure_socket_dir: bool) -> Tuple[socket.socket, str]:
    """A connected blocking socket, and the path it is connected to.

    Unless ``insecure_socket_dir``, the socket's directory is opened once and
    checked as the daemon checks it (owned by us or root, not a symlink, not
    writable by others unless sticky, and then the socket must be ours or
    root's), and the connection goes through that open directory, so a path
    swapped after the check is not followed.
    """
    target = os.fspath(path) if path is not None else default_socket_path()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        if insecure_socket_dir:
            sock.connect(target)
        else:
            _connect_checked(sock, target)
    except SessiondError:
        sock.close()
        raise
    except OSError as e:
        sock.close()
        raise ConnectFailed(
            f"cannot connect to {target}: {e.strerror or e} (is `sessiond serve` running?)",
            details={"path": target, "errno": e.errno},
        ) from e
    return sock, target


def _connect_checked(sock: socket.socket, target: str) -> None:
    directory, name = os.path.split(target)
    directory = directory or "."
    try:
        fd = os.open(directory, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        if e.errno in (errno.ENOTDIR, errno.ELOOP) and os.path.islink(directory):
            raise UnsafeSocketDir(f"the socket directory {directory} is a symlink") from e
        raise
    try:
        st = os.fstat(fd)
        me = os.geteuid()
        if st.st_uid not in (me, 0):
            raise UnsafeSocketDir(
                f"the socket directory {directory} is owned by uid {st.st_uid}, not by us ({me}) or root"
            )
        if st.st_mode & stat.S_IWOTH:
            if not st.st_mode & stat.S_ISVTX:
                raise UnsafeSocketDir(f"the socket directory {directory} is writable by others")
            owner = os.stat(name, dir_fd=fd, follow_symlinks=False).st_uid
            if owner not in (me, 0):
                raise UnsafeSocketDir(
                    f"the socket {target} in a shared directory is owned by uid {owner}"
                )
        sock.connect(f"/proc/self/fd/{fd}/{name}")
    finally:
        os.close(fd)


def encode_request(request_id: int, method: str, params: Optional[Mapping[str, Any]]) -> bytes:
    """One request frame: the length prefix and the MessagePack map."""
    frame: Dict[str, Any] = {"id": request_id, "method": method}
    if params:
        frame["params"] = dict(params)
    body: bytes = msgpack.packb(frame, use_bin_type=True)
    return HEADER.pack(len(body)) + body


def decode_body(body: bytes) -> Any:
    """A frame's MessagePack value (``bin`` as bytes, ``str`` as str)."""
    return msgpack.unpackb(body, raw=False, strict_map_key=False)


class Frame:
    """One frame from the daemon, sorted: an event, a result or an error of ``id``."""

    __slots__ = ("id", "event", "result", "error")

    def __init__(
        self,
        request_id: Optional[int],
        event: Optional[Mapping[str, Any]] = None,
        result: Any = None,
        error: Optional[SessiondError] = None,
    ) -> None:
        self.id = request_id
        self.event = event
        self.result = result
        self.error = error

    @property
    def final(self) -> bool:
        """Whether it ends its request (a result or an error, not an event)."""
        return self.event is None


def sort_frame(body: bytes) -> Optional[Frame]:
    """The frame's meaning, or None for a frame that cannot be used (skipped)."""
    try:
        value = decode_body(body)
    except Exception:
        return None
    if not isinstance(value, Mapping):
        return None
    raw_id = value.get("id")
    request_id = raw_id if isinstance(raw_id, int) and not isinstance(raw_id, bool) else None
    if "event" in value and request_id is not None:
        return Frame(request_id, event=value)
    if "result" in value:
        return Frame(request_id, result=value["result"])
    if "error" in value:
        return Frame(request_id, error=error_from_wire(value["error"]))
    if request_id is None:
        return None
    return Frame(request_id, error=ProtocolError("answer has neither result nor error"))


def params(**kwargs: Any) -> Dict[str, Any]:
    """A params map without the params left at None (absent, as the protocol reads nil)."""
    return {k: v for k, v in kwargs.items() if v is not None}


def exec_params(
    session_id: str,
    command: str,
    *,
    timeout_s: Optional[float] = None,
    stdin: Union[bytes, str, None] = None,
    env: Optional[Mapping[str, str]] = None,
    keep_output: Optional[str] = None,
    idle_timeout_s: Optional[float] = None,
    stream: Optional[bool] = None,
    stdin_open: Optional[bool] = None,
    pty: Optional[Tuple[int, int]] = None,
) -> Dict[str, Any]:
    """The params of ``exec.run`` / ``exec.start``; ``pty`` is (rows, cols)."""
    return params(
        session_id=session_id,
        command=command,
        timeout_s=timeout_s,
        stdin=stdin,
        env=dict(env) if env is not None else None,
        keep_output=keep_output,
        idle_timeout_s=idle_timeout_s,
        stream=stream or None,
        stdin_open=stdin_open or None,
        pty=pty_param(pty),
    )


def pty_param(pty: Optional[Tuple[int, int]]) -> Optional[Dict[str, int]]:
    """``(rows, cols)`` as the wire's ``{"rows", "cols"}`` (the daemon checks the bounds)."""
    if pty is None:
        return None
    rows, cols = pty
    return {"rows": int(rows), "cols": int(cols)}


def retry_delay(error: SessiondError, attempt: int) -> float:
    """Seconds to wait before retrying after ``error``: what the daemon said, else a backoff."""
    after = error.details.get("retry_after_ms")
    if isinstance(after, (int, float)) and not isinstance(after, bool) and after >= 0:
        return max(float(after) / 1000.0, 0.001)
    return min(0.05 * 2.0**attempt, 2.0)

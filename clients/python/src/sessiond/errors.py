"""Exceptions: one class per protocol error code, all under :class:`SessiondError`."""

from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Type


class SessiondError(Exception):
    """Base of every error this package raises.

    ``code`` is the protocol's error code (``"SESSION_BUSY"``…), or one of
    the client's own (``"CONNECTION_CLOSED"``, ``"CALL_TIMEOUT"``,
    ``"PROTOCOL_ERROR"``). A code this package does not know (a newer daemon
    may send one) is raised as this base class. ``details`` holds the error
    map's extra fields (``limit``, ``retry_after_ms``…).
    """

    code: str = "UNKNOWN"

    def __init__(
        self,
        message: str,
        code: Optional[str] = None,
        details: Optional[Mapping[str, Any]] = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.details: Dict[str, Any] = dict(details or {})

    @property
    def limit(self) -> Optional[int]:
        """The ``limit`` the request went over, when the daemon sent one."""
        value = self.details.get("limit")
        return value if isinstance(value, int) else None

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


class InvalidRequest(SessiondError):
    """``INVALID_REQUEST``: a bad frame, a missing or mistyped param, a bad value."""

    code = "INVALID_REQUEST"


class UnknownMethod(SessiondError):
    """``UNKNOWN_METHOD``: the daemon does not know the method."""

    code = "UNKNOWN_METHOD"


class FrameTooLarge(SessiondError):
    """``FRAME_TOO_LARGE``: a request over ``server.max_request_bytes``; the connection closes."""

    code = "FRAME_TOO_LARGE"


class StdinTooLarge(SessiondError):
    """``STDIN_TOO_LARGE``: ``stdin`` or ``data`` over ``commands.max_stdin_bytes``."""

    code = "STDIN_TOO_LARGE"


class TooManySessions(SessiondError):
    """``TOO_MANY_SESSIONS``: ``sessions.max_sessions`` sessions are alive."""

    code = "TOO_MANY_SESSIONS"


class ClientSessionLimit(SessiondError):
    """``CLIENT_SESSION_LIMIT``: this uid holds ``sessions.max_sessions_per_client`` sessions."""

    code = "CLIENT_SESSION_LIMIT"


class SessionNotFound(SessiondError):
    """``SESSION_NOT_FOUND``: unknown, destroyed, expired, or another uid's session."""

    code = "SESSION_NOT_FOUND"


class CommandNotFound(SessiondError):
    """``COMMAND_NOT_FOUND``: unknown command id, no longer retained, or another uid's."""

    code = "COMMAND_NOT_FOUND"


class SessionBusy(SessiondError):
    """``SESSION_BUSY``: the session already runs ``commands.max_per_session`` commands."""

    code = "SESSION_BUSY"


class TooManyCommands(SessiondError):
    """``TOO_MANY_COMMANDS``: ``commands.max_concurrent`` commands run across the daemon."""

    code = "TOO_MANY_COMMANDS"


class _RetryAfter(SessiondError):
    """An error that says when to try again (``retry_after_ms``)."""

    @property
    def retry_after(self) -> Optional[float]:
        """Seconds until the daemon would admit the request, when it said."""
        value = self.details.get("retry_after_ms")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return max(0.0, float(value) / 1000.0)
        return None


class RateLimited(_RetryAfter):
    """``RATE_LIMITED``: this uid is over its token bucket; see :attr:`retry_after`."""

    code = "RATE_LIMITED"


class Overloaded(_RetryAfter):
    """``OVERLOADED``: the daemon is over its memory budget; see :attr:`retry_after`."""

    code = "OVERLOADED"


class ShuttingDown(SessiondError):
    """``SHUTTING_DOWN``: the daemon drains after SIGTERM and starts nothing new."""

    code = "SHUTTING_DOWN"


class SpawnFailed(SessiondError):
    """``SPAWN_FAILED``: the command (or a session's ``init``) could not be started."""

    code = "SPAWN_FAILED"


class PermissionDenied(SessiondError):
    """``PERMISSION_DENIED``: this uid may not connect; the connection closes."""

    code = "PERMISSION_DENIED"


class TooManyConnections(SessiondError):
    """``TOO_MANY_CONNECTIONS``: over ``server.max_connections``; the connection closes."""

    code = "TOO_MANY_CONNECTIONS"


class Internal(SessiondError):
    """``INTERNAL``: the actor serving the request failed; the daemon goes on."""

    code = "INTERNAL"


class ConnectionClosed(SessiondError, ConnectionError):
    """The connection ended before the answer came (client side, ``CONNECTION_CLOSED``)."""

    code = "CONNECTION_CLOSED"


class CallTimeout(SessiondError, TimeoutError):
    """No answer within the call's timeout (client side, ``CALL_TIMEOUT``).

    The call is abandoned; the daemon may still carry out the request.
    """

    code = "CALL_TIMEOUT"


class ProtocolError(SessiondError):
    """The daemon sent something this client cannot use (client side, ``PROTOCOL_ERROR``)."""

    code = "PROTOCOL_ERROR"


class UnsafeSocketDir(SessiondError):
    """The socket's directory could be written by someone else (client side).

    Anyone who can write there could put their own socket in the daemon's
    place; pass ``insecure_socket_dir=True`` to connect anyway.
    """

    code = "UNSAFE_SOCKET_DIR"


_BY_CODE: Dict[str, Type[SessiondError]] = {
    cls.code: cls
    for cls in (
        InvalidRequest,
        UnknownMethod,
        FrameTooLarge,
        StdinTooLarge,
        TooManySessions,
        ClientSessionLimit,
        SessionNotFound,
        CommandNotFound,
        SessionBusy,
        TooManyCommands,
        RateLimited,
        Overloaded,
        ShuttingDown,
        SpawnFailed,
        PermissionDenied,
        TooManyConnections,
        Internal,
    )
}

#: Codes after which the same request may succeed later, as the daemon says.
RETRYABLE_CODES = frozenset({"RATE_LIMITED", "OVERLOADED"})


def error_from_wire(error: Any) -> SessiondError:
    """The exception for an error map of the protocol (unknown codes: the base class)."""
    if not isinstance(error, Mapping):
        return ProtocolError(f"error is not a map: {error!r}")
    code = error.get("code")
    message = error.get("message")
    code_s = code if isinstance(code, str) else "UNKNOWN"
    message_s = message if isinstance(message, str) else ""
    details = {k: v for k, v in error.items() if k not in ("code", "message")}
    cls = _BY_CODE.get(code_s, SessiondError)
    return cls(message_s, code=code_s, details=details)

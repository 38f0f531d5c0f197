"""Client for sessiond: shell sessions and their commands, over the daemon's Unix socket.

>>> from sessiond import Client
>>> with Client() as client, client.session() as s:
...     print(s.run("echo hello").text())
hello
"""

from ._core import ConnectFailed, default_socket_path
from .aio import AsyncClient, AsyncCommandHandle, AsyncExecStream, AsyncSession
from .client import Client, CommandHandle, ExecStream, Session
from .errors import (
    CallTimeout,
    ClientSessionLimit,
    CommandNotFound,
    ConnectionClosed,
    FrameTooLarge,
    Internal,
    InvalidRequest,
    Overloaded,
    PermissionDenied,
    ProtocolError,
    RateLimited,
    SessionBusy,
    SessiondError,
    SessionNotFound,
    ShuttingDown,
    SpawnFailed,
    StdinTooLarge,
    TooManyCommands,
    TooManyConnections,
    TooManySessions,
    UnknownMethod,
    UnsafeSocketDir,
    error_from_wire,
)
from .types import (
    KILLED_BY_VALUES,
    ExecResult,
    OutputEvent,
    PingResult,
    PtySize,
    ReadResult,
    SessionInfo,
    StatsResult,
)

__version__ = "0.1.0"

#: The protocol version this package speaks.
PROTOCOL = 2

__all__ = [
    "PROTOCOL",
    "KILLED_BY_VALUES",
    "AsyncClient",
    "AsyncCommandHandle",
    "AsyncExecStream",
    "AsyncSession",
    "CallTimeout",
    "Client",
    "ClientSessionLimit",
    "CommandHandle",
    "CommandNotFound",
    "ConnectFailed",
    "ConnectionClosed",
    "ExecResult",
    "ExecStream",
    "FrameTooLarge",
    "Internal",
    "InvalidRequest",
    "OutputEvent",
    "Overloaded",
    "PermissionDenied",
    "PingResult",
    "PtySize",
    "ProtocolError",
    "RateLimited",
    "ReadResult",
    "Session",
    "SessionBusy",
    "SessionInfo",
    "SessionNotFound",
    "SessiondError",
    "ShuttingDown",
    "SpawnFailed",
    "StatsResult",
    "StdinTooLarge",
    "TooManyCommands",
    "TooManyConnections",
    "TooManySessions",
    "UnknownMethod",
    "UnsafeSocketDir",
    "default_socket_path",
    "error_from_wire",
]

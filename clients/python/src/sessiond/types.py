"""Results of the protocol's methods as dataclasses, fields named as on the wire.

Every result keeps the fields this package does not know (a newer daemon may
send more) in ``extra``; ``killed_by`` is a plain string, so values added later
pass through unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Tuple

from .errors import ProtocolError

#: ``killed_by`` values of protocol 2 (a newer daemon may send others).
KILLED_BY_VALUES = frozenset(
    {
        "timeout",
        "idle_timeout",
        "cancelled",
        "session_destroyed",
        "shutdown",
        "cpu_limit",
        "memory_limit",
    }
)

#: A pseudo-terminal's size as the ``pty=`` keyword takes it: (rows, cols).
PtySize = Tuple[int, int]


def _map(value: Any, what: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ProtocolError(f"{what}: expected a map, got {type(value).__name__}")
    return value


def _extra(m: Mapping[str, Any], known: Any) -> Dict[str, Any]:
    return {k: v for k, v in m.items() if k not in known}


def _bytes(value: Any) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode()
    return b""


def _int(value: Any, default: int = 0) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else default


def _opt_int(value: Any) -> Optional[int]:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _opt_str(value: Any) -> Optional[str]:
    return value if isinstance(value, str) else None


@dataclass
class PingResult:
    """``system.ping``: the daemon is there, and what it speaks."""

    pong: bool
    version: str
    protocol: int
    uptime_ms: int
    features: List[str]
    extra: Dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_wire(cls, value: Any) -> "PingResult":
        m = _map(value, "system.ping result")
        features = m.get("features")
        return cls(
            pong=bool(m.get("pong")),
            version=str(m.get("version", "")),
            protocol=_int(m.get("protocol"), 1),
            uptime_ms=_int(m.get("uptime_ms")),
            features=[f for f in features if isinstance(f, str)] if isinstance(features, list) else [],
            extra=_extra(m, cls.__dataclass_fields__),
        )


@dataclass
class StatsResult:
    """``system.stats``: the four groups of counters and gauges, as the daemon sent them."""

    sessions: Dict[str, Any]
    commands: Dict[str, Any]
    clients: Dict[str, Any]
    runtime: Dict[str, Any]
    extra: Dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_wire(cls, value: Any) -> "StatsResult":
        m = _map(value, "system.stats result")

        def group(name: str) -> Dict[str, Any]:
            g = m.get(name)
            return dict(g) if isinstance(g, Mapping) else {}

        return cls(
            sessions=group("sessions"),
            commands=group("commands"),
            clients=group("clients"),
            runtime=group("runtime"),
            extra=_extra(m, cls.__dataclass_fields__),
        )


@dataclass
class SessionInfo:
    """One entry of ``session.list``."""

    session_id: str
    created_ms_ago: int
    idle_ms: int
    busy: bool
    cwd: str
    command_ids: List[str]
    command_id: Optional[str]
    #: Forks refused so far by the session's ``pids_max`` (None without
    #: cgroups, or from an older daemon).
    pids_limit_hits: Optional[int] = None
    extra: Dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_wire(cls, value: Any) -> "SessionInfo":
        m = _map(value, "session.list entry")
        ids = m.get("command_ids")
        return cls(
            session_id=str(m.get("session_id", "")),
            created_ms_ago=_int(m.get("created_ms_ago")),
            idle_ms=_int(m.get("idle_ms")),
            busy=bool(m.get("busy")),
            cwd=str(m.get("cwd", "")),
            command_ids=[i for i in ids if isinstance(i, str)] if isinstance(ids, list) else [],
            command_id=_opt_str(m.get("command_id")),
            pids_limit_hits=_opt_int(m.get("pids_limit_hits")),
            extra=_extra(m, cls.__dataclass_fields__),
        )


@dataclass
class ExecResult:
    """The result of a command (``exec.run``; ``exec.read``'s ``result`` once done).

    ``stdout`` and ``stderr`` are bytes; :meth:`text` and :meth:`stderr_text`
    decode them.
    """

    command_id: Optional[str]
    exit_code: Optional[int]
    signal: Optional[int]
    timed_out: bool
    killed_by: Optional[str]
    stdout: bytes
    stderr: bytes
    stdout_truncated: bool
    stderr_truncated: bool
    stdout_total_bytes: int
    stderr_total_bytes: int
    duration_ms: int
    cpu_ms: Optional[int]
    max_rss_bytes: Optional[int]
    cwd: str
    state_error: Optional[str] = None
    #: Forks the session's ``pids_max`` refused while the command ran (None
    #: without cgroups, or from an older daemon).
    pids_limit_hits: Optional[int] = None
    extra: Dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_wire(cls, value: Any) -> "ExecResult":
        m = _map(value, "exec result")
        return cls(
            command_id=_opt_str(m.get("command_id")),
            exit_code=_opt_int(m.get("exit_code")),
            signal=_opt_int(m.get("signal")),
            timed_out=bool(m.get("timed_out")),
            killed_by=_opt_str(m.get("killed_by")),
            stdout=_bytes(m.get("stdout")),
            stderr=_bytes(m.get("stderr")),
            stdout_truncated=bool(m.get("stdout_truncated")),
            stderr_truncated=bool(m.get("stderr_truncated")),
            stdout_total_bytes=_int(m.get("stdout_total_bytes")),
            stderr_total_bytes=_int(m.get("stderr_total_bytes")),
            duration_ms=_int(m.get("duration_ms")),
            cpu_ms=_opt_int(m.get("cpu_ms")),
            max_rss_bytes=_opt_int(m.get("max_rss_bytes")),
            cwd=str(m.get("cwd", "")),
            state_error=_opt_str(m.get("state_error")),
            pids_limit_hits=_opt_int(m.get("pids_limit_hits")),
            extra=_extra(m, cls.__dataclass_fields__),
        )

    @property
    def ok(self) -> bool:
        """The command ended by itself with exit code 0."""
        return self.exit_code == 0 and self.killed_by is None

    def text(self, encoding: str = "utf-8", errors: str = "replace") -> str:
        """``stdout`` decoded (undecodable bytes replaced by default)."""
        return self.stdout.decode(encoding, errors)

    def stderr_text(self, encoding: str = "utf-8", errors: str = "replace") -> str:
        """``stderr`` decoded (undecodable bytes replaced by default)."""
        return self.stderr.decode(encoding, errors)


@dataclass
class ReadResult:
    """``exec.read``: retained bytes from the asked offsets on, and the result once done."""

    stdout: bytes
    stderr: bytes
    stdout_offset: int
    stderr_offset: int
    stdout_next: int
    stderr_next: int
    done: bool
    result: Optional[ExecResult]
    extra: Dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_wire(cls, value: Any) -> "ReadResult":
        m = _map(value, "exec.read result")
        result = m.get("result")
        return cls(
            stdout=_bytes(m.get("stdout")),
            stderr=_bytes(m.get("stderr")),
            stdout_offset=_int(m.get("stdout_offset")),
            stderr_offset=_int(m.get("stderr_offset")),
            stdout_next=_int(m.get("stdout_next")),
            stderr_next=_int(m.get("stderr_next")),
            done=bool(m.get("done")),
            result=ExecResult.from_wire(result) if result is not None else None,
            extra=_extra(m, cls.__dataclass_fields__),
        )


@dataclass
class OutputEvent:
    """An ``output`` event of a streaming ``exec.run``: ``data`` starts at ``offset`` of ``stream``."""

    stream: str
    offset: int
    data: bytes

    def text(self, encoding: str = "utf-8", errors: str = "replace") -> str:
        """``data`` decoded (a multi-byte character may be split between events)."""
        return self.data.decode(encoding, errors)

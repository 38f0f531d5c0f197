#!/usr/bin/env python3
"""Side by side, in one run: SWE-ReX 1.4's own server and sessiond, both driven
through SWE-ReX's ``AbstractRuntime`` (``RemoteRuntime`` against
``swerex-remote``, ``SessiondRuntime`` against the daemon), so each figure is
what a SWE-agent user sees.

Workloads: ``true`` in a session (p50, p99), 8 sessions running ``true`` back
to back at once (commands/s across all), create + close of a session (p50),
and the memory of an idle session (RSS of the server's whole process tree —
SWE-ReX keeps a bash per session — after creating ``--idle`` sessions, minus
before, per session).

Needs a venv with ``pip install ./clients/python[swerex] aiohttp`` (aiohttp:
SWE-ReX's RemoteRuntime imports it without declaring it) and a sessiond
binary (``cargo build --release -p sessiond``)::

    python bench/swerex_compare.py --daemon target/release/sessiond --out /tmp/swerex-compare.json

Both servers are started here, each on its own port or socket, and stopped at
the end (sessiond must exit 0 on SIGTERM). sessiond runs with cgroups off, its
per-uid rate limit off (200 requests/s by default: the 8-session run is a
measure of the daemon, not of that policy) and room for the idle sessions (8
per uid by default); timeouts, output caps and rlimits apply as always. Absolute times depend on the
machine and its load: the script prints the 1-minute load average with them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pathlib
import platform
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Awaitable, Callable, Dict, Iterator, List, Tuple

from swerex.runtime.abstract import (
    AbstractRuntime,
    BashAction,
    CloseBashSessionRequest,
    CreateBashSessionRequest,
)
from swerex.runtime.remote import RemoteRuntime

from sessiond.swerex import SessiondRuntime

REPO = pathlib.Path(__file__).resolve().parents[1]


def rss_tree(pid: int) -> int:
    """Bytes of RSS of ``pid`` and all its descendants."""
    children: Dict[int, List[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        todo.extend(children.get(p, []))
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


def pct(samples: List[float], q: float) -> float:
    s = sorted(samples)
    return s[min(len(s) - 1, int(q * len(s)))]


async def run_counted(rt: AbstractRuntime, a: BashAction, errors: List[str]) -> bool:
    """One command; a failure is counted, not fatal (SWE-ReX's server fails
    commands on a loaded machine: it waits a fixed 0.1 s for its prompt)."""
    try:
        await rt.run_in_session(a)
        return True
    except Exception as e:  # noqa: BLE001 - counted and reported
        errors.append(f"{type(e).__name__}: {str(e)[:200]}")
        return False


async def seq_true(rt: AbstractRuntime, n: int, warmup: int) -> Dict[str, Any]:
    await rt.create_session(CreateBashSessionRequest(session="seq"))
    a = BashAction(command="true", session="seq", timeout=30)
    errors: List[str] = []
    for _ in range(warmup):
        await run_counted(rt, a, errors)
    times = []
    for _ in range(n):
        t = time.perf_counter()
        if await run_counted(rt, a, errors):
            times.append(time.perf_counter() - t)
    await rt.close_session(CloseBashSessionRequest(session="seq"))
    return {"p50_ms": pct(times, 0.5) * 1e3, "p99_ms": pct(times, 0.99) * 1e3, "n": n, "errors": errors}


async def concurrent(rt: AbstractRuntime, sessions: int, seconds: float) -> Dict[str, Any]:
    names = [f"c{i}" for i in range(sessions)]
    for name in names:
        await rt.create_session(CreateBashSessionRequest(session=name))
    errors: List[str] = []
    for name in names:  # warm-up
        await run_counted(rt, BashAction(command="true", session=name, timeout=30), errors)
    end = time.perf_counter() + seconds
    counts = [0] * sessions

    async def loop(i: int) -> None:
        a = BashAction(command="true", session=names[i], timeout=30)
        while time.perf_counter() < end:
            if await run_counted(rt, a, errors):
                counts[i] += 1

    t = time.perf_counter()
    await asyncio.gather(*(loop(i) for i in range(sessions)))
    elapsed = time.perf_counter() - t
    for name in names:
        await rt.close_session(CloseBashSessionRequest(session=name))
    return {"commands_per_s": sum(counts) / elapsed, "sessions": sessions, "seconds": elapsed, "errors": errors}


async def create_close(rt: AbstractRuntime, n: int) -> Dict[str, float]:
    times = []
    for i in range(n):
        t = time.perf_counter()
        await rt.create_session(CreateBashSessionRequest(session=f"cc{i}"))
        await rt.close_session(CloseBashSessionRequest(session=f"cc{i}"))
        times.append(time.perf_counter() - t)
    return {"p50_ms": pct(times, 0.5) * 1e3, "p99_ms": pct(times, 0.99) * 1e3, "n": n}


async def idle_memory(rt: AbstractRuntime, server_pid: int, k: int) -> Dict[str, float]:
    # One session first, so that lazily loaded code is not counted.
    await rt.create_session(CreateBashSessionRequest(session="first"))
    await rt.run_in_session(BashAction(command="true", session="first", timeout=30))
    await asyncio.sleep(0.5)
    before = rss_tree(server_pid)
    for i in range(k):
        await rt.create_session(CreateBashSessionRequest(session=f"idle{i}"))
    await asyncio.sleep(0.5)
    after = rss_tree(server_pid)
    for i in range(k):
        await rt.close_session(CloseBashSessionRequest(session=f"idle{i}"))
    await rt.close_session(CloseBashSessionRequest(session="first"))
    return {"bytes_per_session": (after - before) / k, "sessions": k, "rss_before": before, "rss_after": after}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.05)


def start_swerex() -> Tuple[subprocess.Popen[bytes], RemoteRuntime]:
    exe = shutil.which("swerex-remote", path=os.path.dirname(sys.executable)) or shutil.which("swerex-remote")
    if exe is None:
        raise SystemExit("swerex-remote not found: pip install swe-rex==1.4.0 in this venv")
    port, token = free_port(), secrets.token_hex(8)
    proc = subprocess.Popen(
        [exe, "--host", "127.0.0.1", "--port", str(port), "--auth-token", token],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    def up() -> bool:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return True
        except OSError:
            return False

    wait_for(up, 30, "swerex-remote")
    return proc, RemoteRuntime(host="http://127.0.0.1", port=port, auth_token=token)


def start_sessiond(binary: str, d: str) -> Tuple[subprocess.Popen[bytes], SessiondRuntime]:
    path = f"{d}/sessiond.sock"
    pathlib.Path(d, "work").mkdir()
    pathlib.Path(d, "config.toml").write_text(
        f"""
[server]
socket = "{path}"
[sessions]
default_cwd = "{d}/work"
max_sessions = 1024
max_sessions_per_client = 1024
[cgroups]
mode = "off"
[rate_limit]
requests_per_second = 0
[commands.env]
PATH = "/usr/local/bin:/usr/bin:/bin"
"""
    )
    proc = subprocess.Popen(
        [binary, "serve", "--config", f"{d}/config.toml"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=open(f"{d}/daemon.log", "ab"),
    )
    wait_for(lambda: os.path.exists(path), 30, "sessiond's socket")
    return proc, SessiondRuntime(path)


async def measure(rt: AbstractRuntime, pid: int, args: argparse.Namespace, slow: bool) -> Dict[str, Any]:
    n, cc = (args.n_slow, args.cc_slow) if slow else (args.n, args.cc)
    out = {
        "true_in_session": await seq_true(rt, n, warmup=5),
        "concurrent_8": await concurrent(rt, 8, args.seconds),
        "create_close": await create_close(rt, cc),
        "idle_session_memory": await idle_memory(rt, pid, args.idle),
    }
    await rt.close()
    return out


def stop(proc: subprocess.Popen[bytes], must_exit_zero: bool) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        code = proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise
    if must_exit_zero and code != 0:
        raise SystemExit(f"sessiond exited {code} on SIGTERM")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--daemon", default=str(REPO / "target" / "release" / "sessiond"))
    p.add_argument("--out", default="swerex-compare.json")
    p.add_argument("--n", type=int, default=500, help="`true` runs against sessiond")
    p.add_argument("--n-slow", type=int, default=50, help="`true` runs against swerex-remote")
    p.add_argument("--cc", type=int, default=200, help="create+close pairs against sessiond")
    p.add_argument("--cc-slow", type=int, default=20, help="create+close pairs against swerex-remote")
    p.add_argument("--seconds", type=float, default=5.0, help="length of the 8-session run")
    p.add_argument("--idle", type=int, default=32, help="idle sessions for the memory figure")
    args = p.parse_args()
    if not os.access(args.daemon, os.X_OK):
        raise SystemExit(f"no sessiond binary at {args.daemon}: cargo build --release -p sessiond")

    results: Dict[str, Any] = {
        "machine": {
            "cpus": os.cpu_count(),
            "kernel": platform.release(),
            "loadavg_1m_before": os.getloadavg()[0],
            "python": platform.python_version(),
        }
    }
    proc, rt = start_swerex()
    try:
        results["swerex_remote"] = asyncio.run(measure(rt, proc.pid, args, slow=True))
    finally:
        stop(proc, must_exit_zero=False)
    with tempfile.TemporaryDirectory(prefix="sessiond-swerex-bench-") as d:
        dproc, drt = start_sessiond(args.daemon, d)
        try:
            results["sessiond"] = asyncio.run(measure(drt, dproc.pid, args, slow=False))
        finally:
            stop(dproc, must_exit_zero=True)
    results["machine"]["loadavg_1m_after"] = os.getloadavg()[0]
    pathlib.Path(args.out).write_text(json.dumps(results, indent=2) + "\n")

    s, x = results["sessiond"], results["swerex_remote"]
    rows = [
        ("`true` in a session, p50", x["true_in_session"]["p50_ms"], s["true_in_session"]["p50_ms"], "ms", True),
        ("`true` in a session, p99", x["true_in_session"]["p99_ms"], s["true_in_session"]["p99_ms"], "ms", True),
        ("8 sessions at once", x["concurrent_8"]["commands_per_s"], s["concurrent_8"]["commands_per_s"], "cmds/s", False),
        ("create + close a session, p50", x["create_close"]["p50_ms"], s["create_close"]["p50_ms"], "ms", True),
        (
            "memory per idle session (RSS)",
            x["idle_session_memory"]["bytes_per_session"] / 1e6,
            s["idle_session_memory"]["bytes_per_session"] / 1e6,
            "MB",
            True,
        ),
    ]
    print("| workload | swerex-remote 1.4.0 | sessiond | sessiond's advantage |")
    print("|---|---|---|---|")
    for name, xv, sv, unit, lower_better in rows:
        ratio = (xv / sv if lower_better else sv / xv) if sv and xv else float("nan")
        print(f"| {name} | {xv:.3g} {unit} | {sv:.3g} {unit} | {ratio:,.0f} × |")
    for backend in ("swerex_remote", "sessiond"):
        for workload in ("true_in_session", "concurrent_8"):
            errors = results[backend][workload]["errors"]
            if errors:
                print(f"{backend} {workload}: {len(errors)} commands failed, e.g. {errors[0]}")
    m = results["machine"]
    print(f"\n{m['cpus']} CPUs, Linux {m['kernel']}, load average {m['loadavg_1m_before']:.2f} → {m['loadavg_1m_after']:.2f}")


if __name__ == "__main__":
    main()

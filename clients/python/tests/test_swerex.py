"""sessiond.swerex against a real daemon: what SWE-ReX's own suite does not cover.

Needs the [swerex] extra; clients/python/swerex-suite.sh runs this file with it
(and SESSIOND_REQUIRE_SWEREX=1, so a missing extra fails there). ci.sh, which
installs only [test], runs the first test and skips the others, naming why.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
from typing import Any, Awaitable, Callable, Iterator, TypeVar

import pytest

from conftest import Daemon, wait_until

T = TypeVar("T")


def run(main: Callable[[], Awaitable[T]]) -> T:
    return asyncio.run(asyncio.wait_for(main(), 120))  # type: ignore[arg-type]


def test_the_package_imports_without_swerex() -> None:
    code = "import sys, sessiond; assert not any(m == 'swerex' or m.startswith('swerex.') for m in sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.fixture
def sx() -> Any:
    """The adapter module (and SWE-ReX's request models through it)."""
    if os.environ.get("SESSIOND_REQUIRE_SWEREX"):
        import sessiond.swerex as mod
    else:
        mod = pytest.importorskip("sessiond.swerex", reason="needs the [swerex] extra: swerex-suite.sh runs this")
    return mod


@pytest.fixture
def A(sx: Any) -> Any:
    from swerex.runtime.abstract import BashAction

    return BashAction


def test_terminal_state_survives_and_nothing_of_a_bad_command_runs(daemon: Daemon, sx: Any, A: Any) -> None:
    from swerex.exceptions import BashIncorrectSyntaxError, CommandTimeoutError, SessionExistsError
    from swerex.runtime.abstract import CreateBashSessionRequest

    async def main() -> None:
        rt = sx.SessiondRuntime(daemon.socket)
        try:
            await rt.create_session(CreateBashSessionRequest())
            with pytest.raises(SessionExistsError):
                await rt.create_session(CreateBashSessionRequest())
            await rt.run_in_session(A(command="x=unexported; f() { echo fn $1; }; mkdir -p sub && cd sub"))
            r = await rt.run_in_session(A(command="echo $x; f 1; basename $PWD"))
            assert r.output == "unexported\nfn 1\nsub\n"
            # stderr is interleaved into the output, as on a terminal.
            r = await rt.run_in_session(A(command="echo a; echo b >&2; echo c", check="silent"))
            assert (r.output, r.exit_code) == ("a\nb\nc\n", 0)
            # A syntax error on line 2: line 1 did not run either.
            with pytest.raises(BashIncorrectSyntaxError) as e:
                await rt.run_in_session(A(command="touch ran\n(a"))
            assert "line" in e.value.extra_info["bash_stderr"]
            assert "}" not in e.value.extra_info["bash_stderr"], "the message shows our wrapper"
            r = await rt.run_in_session(A(command="ls ran", check="silent"))
            assert r.exit_code == 2
            # A timed-out command is killed, its processes with it.
            with pytest.raises(CommandTimeoutError):
                await rt.run_in_session(A(command="echo $$ > pid; sleep 60", timeout=0.5))
            pid = int((await rt.run_in_session(A(command="cat pid"))).output)
            wait_until(lambda: not os.path.exists(f"/proc/{pid}"), 10, "the timed-out shell to be gone")
            # A caller that gives up (asyncio.wait_for) stops the command too:
            # the session is free for the next one.
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(rt.run_in_session(A(command="sleep 60", timeout=30)), 0.5)
            assert (await rt.run_in_session(A(command="echo free"))).output == "free\n"
        finally:
            await rt.close()

    run(main)


def test_one_runtime_across_event_loops(daemon: Daemon, sx: Any, A: Any) -> None:
    """SWE-agent calls every method through its own asyncio.run()."""
    from swerex.runtime.abstract import CloseBashSessionRequest, CreateBashSessionRequest

    rt = sx.SessiondRuntime(daemon.socket)
    asyncio.run(rt.create_session(CreateBashSessionRequest(session="s")))
    asyncio.run(rt.run_in_session(A(command="v=1", session="s")))
    assert asyncio.run(rt.run_in_session(A(command="echo $v", session="s"))).output == "1\n"
    for _ in range(20):
        asyncio.run(rt.run_in_session(A(command="true", session="s")))
    with daemon.client() as c:
        # The connections of ended loops are closed, not left to the collector.
        wait_until(lambda: c.stats().clients["connections"] <= 2, 10, "the old connections to close")
    asyncio.run(rt.close_session(CloseBashSessionRequest(session="s")))
    asyncio.run(rt.close())


def test_deployment_and_startup_source(daemon: Daemon, sx: Any, A: Any, tmp_path: pathlib.Path) -> None:
    from swerex.exceptions import DeploymentNotStartedError
    from swerex.runtime.abstract import CreateBashSessionRequest

    rc = tmp_path / "rc.sh"
    rc.write_text("STARTED=yes\necho sourced\n")

    async def main() -> None:
        dep = sx.SessiondDeployment(daemon.socket)
        with pytest.raises(DeploymentNotStartedError):
            dep.runtime
        assert not await dep.is_alive()
        await dep.start()
        assert await dep.is_alive()
        r = await dep.runtime.create_session(CreateBashSessionRequest(startup_source=[str(rc)]))
        assert r.output == "sourced\n"
        assert (await dep.runtime.run_in_session(A(command="echo $STARTED"))).output == "yes\n"
        await dep.stop()

    run(main)
    with daemon.client() as c:
        assert c.list_sessions() == [], "stop() left sessions behind"


def test_large_files_go_in_bounded_chunks(daemon: Daemon, sx: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from swerex.runtime.abstract import Command, ReadFileRequest, UploadRequest, WriteFileRequest

    # Ask for more than the daemon's 4 MiB output cap: read_file follows the cap.
    monkeypatch.setattr(sx, "READ_CHUNK", 16 << 20)
    blob = os.urandom(3 << 20)

    async def main() -> None:
        rt = sx.SessiondRuntime(daemon.socket)
        with tempfile.TemporaryDirectory() as d:
            try:
                text = "".join(f"line {i} é\n" for i in range(800_000))  # ~9 MiB
                target = f"{d}/new/dir/big.txt"
                await rt.write_file(WriteFileRequest(path=target, content=text))
                assert pathlib.Path(target).read_text() == text
                assert (await rt.read_file(ReadFileRequest(path=target))).content == text

                src = pathlib.Path(d, "src")
                (src / "a" / "b").mkdir(parents=True)
                (src / "a" / "b" / "blob.bin").write_bytes(blob)
                for i in range(300):
                    (src / f"f{i}.txt").write_text(f"{i}\n")
                await rt.upload(UploadRequest(source_path=str(src), target_path=f"{d}/up/tree"))
                got = pathlib.Path(d, "up", "tree")
                assert (got / "a" / "b" / "blob.bin").read_bytes() == blob
                assert sorted(p.name for p in got.glob("f*.txt")) == sorted(f"f{i}.txt" for i in range(300))
                await rt.upload(UploadRequest(source_path=str(src / "a" / "b" / "blob.bin"), target_path=f"{d}/one"))
                r = await rt.execute(Command(command=["sha256sum", f"{d}/one"]))
                assert r.stdout.split()[0] == hashlib.sha256(blob).hexdigest()
            finally:
                await rt.close()

    run(main)


def test_execute_is_a_fresh_subprocess(daemon: Daemon, sx: Any) -> None:
    from swerex.exceptions import NonZeroExitCodeError
    from swerex.runtime.abstract import Command

    async def main() -> None:
        rt = sx.SessiondRuntime(daemon.socket)
        try:
            await rt.execute(Command(command="cd /; export LEAK=1", shell=True))
            r = await rt.execute(Command(command="echo ${LEAK:-none} $PWD", shell=True, cwd="/tmp"))
            assert r.stdout == "none /tmp\n"
            r = await rt.execute(Command(command=["printf", "%s|", "a b", "$HOME"], env={"K": "v"}))
            assert r.stdout == "a b|$HOME|"
            r = await rt.execute(Command(command="echo $K", shell=True, env={"K": "v"}))
            assert r.stdout == "v\n"
            with pytest.raises(NonZeroExitCodeError):
                await rt.execute(Command(command="exit 3", shell=True, check=True))
        finally:
            await rt.close()

    run(main)


@pytest.fixture
def nobody_dirs() -> Iterator[pathlib.Path]:
    """A directory the user `nobody` may write (w/) inside one only root may (the parent)."""
    top = pathlib.Path(tempfile.mkdtemp(prefix="sessiond-swerex-nobody-"))
    try:
        os.chmod(top, 0o755)
        (top / "w").mkdir()
        shutil.chown(top / "w", "nobody")
        (top / "secret").write_text("root only")
        os.chmod(top / "secret", 0o600)
        yield top
    finally:
        shutil.rmtree(top)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: the daemon runs commands as `nobody`")
def test_file_operations_have_the_sessions_rights(
    make_daemon: Callable[..., Daemon], sx: Any, nobody_dirs: pathlib.Path
) -> None:
    from swerex.runtime.abstract import ReadFileRequest, UploadRequest, WriteFileRequest

    d = make_daemon("", commands_extra='run_as_user = "nobody"')

    async def main() -> None:
        rt = sx.SessiondRuntime(d.socket, cwd=str(nobody_dirs / "w"))
        try:
            await rt.write_file(WriteFileRequest(path="mine.txt", content="ok"))
            assert (nobody_dirs / "w" / "mine.txt").stat().st_uid == 65534 or (
                (nobody_dirs / "w" / "mine.txt").owner() == "nobody"
            )
            with pytest.raises(PermissionError):
                await rt.write_file(WriteFileRequest(path=str(nobody_dirs / "theirs.txt"), content="no"))
            with pytest.raises(PermissionError):
                await rt.read_file(ReadFileRequest(path=str(nobody_dirs / "secret")))
            with pytest.raises(PermissionError):
                await rt.upload(UploadRequest(source_path=__file__, target_path=str(nobody_dirs / "up.py")))
            with pytest.raises(FileNotFoundError):
                await rt.read_file(ReadFileRequest(path="absent"))
            with pytest.raises(IsADirectoryError):
                await rt.read_file(ReadFileRequest(path="."))
        finally:
            await rt.close()

    run(main)
    assert not (nobody_dirs / "theirs.txt").exists()


def test_interactive_repl_pager_prompt_and_ctrl_c(daemon: Daemon, sx: Any, A: Any) -> None:
    """On a pseudo-terminal: a REPL, Ctrl-C into it, `read -p`, a pager."""
    from swerex.exceptions import CommandTimeoutError
    from swerex.runtime.abstract import BashInterruptAction, CreateBashSessionRequest

    async def main() -> None:
        rt = sx.SessiondRuntime(daemon.socket)
        try:
            await rt.create_session(CreateBashSessionRequest())
            await rt.run_in_session(A(command="python3", is_interactive_command=True, expect=[">>> "], timeout=10))
            r = await rt.run_in_session(A(command="print(6*7)", is_interactive_command=True, expect=[">>> "]))
            assert r.output == "42"
            # A busy loop, then Ctrl-C as a keystroke: the REPL is back.
            with pytest.raises(CommandTimeoutError):
                await rt.run_in_session(
                    A(command="while True: pass\n", is_interactive_command=True, expect=["NEVER"], timeout=0.5)
                )
            r = await rt.run_in_session(BashInterruptAction(expect=[">>> "], timeout=5))
            assert "KeyboardInterrupt" in r.output
            await rt.run_in_session(A(command="quit()", is_interactive_quit=True, timeout=10))
            # The session is a shell again, its state intact.
            assert (await rt.run_in_session(A(command="echo back"))).output == "back\n"

            await rt.run_in_session(
                A(command="read -p 'name? ' n; echo hello $n", is_interactive_command=True, expect=[r"name\? "])
            )
            r = await rt.run_in_session(A(command="bob", is_interactive_quit=True, timeout=10))
            assert "hello bob" in r.output

            await rt.run_in_session(A(command="seq 1000 > nums"))
            r = await rt.run_in_session(
                A(command="less nums", is_interactive_command=True, expect=[r"nums"], timeout=10)
            )
            assert "1\n2\n3\n" in r.output
            await rt.run_in_session(A(command="q", is_interactive_quit=True, timeout=10))
            assert (await rt.run_in_session(A(command="echo done"))).output == "done\n"
        finally:
            await rt.close()

    run(main)


def test_refusals_with_retry_after_are_retried(make_daemon: Callable[..., Daemon], sx: Any, A: Any) -> None:
    """RATE_LIMITED here; OVERLOADED takes the same path (the client's retry=True)."""
    from swerex.runtime.abstract import CreateBashSessionRequest

    d = make_daemon("[rate_limit]\nrequests_per_second = 20\nburst = 2\n")

    async def main() -> None:
        rt = sx.SessiondRuntime(d.socket)
        try:
            await rt.create_session(CreateBashSessionRequest())
            for i in range(10):
                assert (await rt.run_in_session(A(command=f"echo {i}"))).output == f"{i}\n"
        finally:
            await rt.close()

    run(main)
    with d.client(retry=True) as c:
        assert c.stats().clients["rate_limited_total"] > 0, "nothing was refused: the test proves nothing"

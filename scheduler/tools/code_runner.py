"""An example code-runner tool that executes LLM-written Python while it is written.

It is an `IncrementalTool` of the "code" format: each complete top-level statement
(`CodeStatementStream`) is sent to a child interpreter and run at once, while the LLM
keeps writing the next one (Conveyor's partial execution). Statements run in order in
one namespace, like a script; the first error stops the run. Errors, timeouts and
output are the tool's *result* (what an agent reads back), not tool failures.

Isolation, and its limits (read before exposing it):
- The code runs in a separate process, `python -I -S` (no site-packages, no user site,
  PYTHON* variables ignored, no current directory on sys.path): only the standard
  library is importable. The environment is empty and the working directory is a fresh
  temporary directory, deleted afterwards.
- Resource limits (`resource.setrlimit`, set by the child before it reads any code):
  CPU seconds, address space, largest file written, open files, no core dumps, and no
  new processes or threads (RLIMIT_NPROC = 0; not enforced when the child runs as root).
- When the server runs as root, the child runs as `nobody:nogroup` with no supplementary
  groups (`drop_privileges`), so it can read only world-readable files and write only
  world-writable places. When the server is not root, the child keeps the server's user
  and can read whatever that user can: run the server as an unprivileged user anyway.
- A wall-clock limit kills the whole process group.
- It is NOT a security boundary against a determined attacker: there is no network
  isolation (no namespaces or seccomp; the child can open sockets), no filesystem
  namespace, and a kernel exploit escapes any of it. For untrusted users, run it inside
  a container or VM sandbox (gVisor, Firecracker, nsjail) in addition.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import json
import os
import pwd
import shutil
import signal
import sys
import tempfile
from dataclasses import dataclass
from typing import Any

from .config import CodeRunnerConfig
from .incremental import IncrementalTool

# The child's driver. It runs *inside the sandboxed child*: executing the code it is sent
# is the whole point of this tool. The server process itself never evaluates that code.
_DRIVER = r"""
import ast, io, json, os, resource, sys, traceback
from contextlib import redirect_stderr, redirect_stdout
for name, value in json.loads(sys.argv[1]).items():
    resource.setrlimit(getattr(resource, name), (value, value))
proto_in = os.fdopen(os.dup(0), "rb", buffering=0)
proto_out = os.fdopen(os.dup(1), "wb", buffering=0)
null = os.open(os.devnull, os.O_RDWR)
for fd in (0, 1, 2):
    os.dup2(null, fd)
cap = int(sys.argv[2])
namespace = {"__name__": "__main__", "__builtins__": __builtins__}
proto_out.write(b'{"ready": true}\n')
while True:
    line = proto_in.readline()
    if not line:
        break
    source = json.loads(line)["code"]
    out, err, error, value = io.StringIO(), io.StringIO(), None, None
    try:
        tree = ast.parse(source, "<llm>", "exec")
        last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
        with redirect_stdout(out), redirect_stderr(err):
            exec(compile(tree, "<llm>", "exec"), namespace)
            if last is not None:
                result = eval(compile(ast.Expression(last.value), "<llm>", "eval"), namespace)
                value = None if result is None else repr(result)[:cap]
    except BaseException as exc:
        frames = exc.__traceback__.tb_next if exc.__traceback__ else None  # skip the driver
        error = "".join(traceback.format_exception(type(exc), exc, frames))[-cap:]
    reply = {"stdout": out.getvalue()[:cap], "stderr": err.getvalue()[:cap],
             "error": error, "value": value}
    proto_out.write(json.dumps(reply).encode() + b"\n")
"""


@dataclass(slots=True)
class _Child:
    """A started child interpreter, ready for statements, in its private directory."""

    proc: asyncio.subprocess.Process
    workdir: str

    def kill(self) -> None:
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)

    async def dispose(self) -> None:
        self.kill()
        with contextlib.suppress(ProcessLookupError):
            await self.proc.wait()
        shutil.rmtree(self.workdir, ignore_errors=True)


class CodeRunner(IncrementalTool):
    """One run: one child process, fed statement by statement."""

    input_format = "code"

    def __init__(self, tool: CodeRunnerTool) -> None:
        self._tool = tool
        self._config = tool.config
        self._queue: asyncio.Queue[str | None] = asyncio.Queue()
        self._worker: asyncio.Task[None] | None = None
        self._child: _Child | None = None
        self._deadline: asyncio.TimerHandle | None = None
        self._timed_out = False
        self._stdout: list[str] = []
        self._stdout_size = 0
        self._value: str | None = None
        self._error: str | None = None
        self._total = 0
        self._ran = 0

    async def on_partial(self, name: str, value: Any) -> None:
        self._total += 1
        self._queue.put_nowait(str(value))
        if self._worker is None:
            self._worker = asyncio.create_task(self._work(), name="code-runner")

    async def finish(self) -> dict[str, Any]:
        self._queue.put_nowait(None)
        if self._worker is not None:
            await self._worker
        return {
            "ok": self._error is None,
            "stdout": "".join(self._stdout),
            "value": self._value,
            "error": self._error,
            "timed_out": self._timed_out,
            "statements_run": self._ran,
            "statements_total": self._total,
        }

    async def aclose(self) -> None:
        if self._worker is not None and not self._worker.done():
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
        if self._deadline is not None:
            self._deadline.cancel()
        if self._child is not None:
            await self._child.dispose()
            self._child = None

    async def _work(self) -> None:
        try:
            self._child = await self._tool.acquire()
        except OSError as exc:
            self._error = f"could not start the code runner: {exc}"
        else:  # the wall-clock limit counts from the first statement
            loop = asyncio.get_running_loop()
            self._deadline = loop.call_later(self._config.timeout_s, self._on_deadline)
        while (statement := await self._queue.get()) is not None:
            if self._error is not None:
                continue  # a script stops at its first error; drain the rest
            await self._execute(statement)

    async def _execute(self, statement: str) -> None:
        assert self._child is not None
        proc = self._child.proc
        assert proc.stdin is not None and proc.stdout is not None
        try:
            proc.stdin.write(json.dumps({"code": statement}).encode() + b"\n")
            await proc.stdin.drain()
        except (BrokenPipeError, ConnectionResetError):
            pass  # the child died; reading its reply reports why
        reply = await _read_reply(self._child)
        if reply is None:
            self._error = await self._death_cause()
            return
        self._ran += 1
        self._append_output(str(reply.get("stdout") or "") + str(reply.get("stderr") or ""))
        self._value = reply.get("value")
        if reply.get("error"):
            self._error = str(reply["error"])

    async def _death_cause(self) -> str:
        """Why the child stopped answering. The CPU limit and the wall-clock limit race
        for a busy loop (which one wins depends on the machine's load), so both count as
        a timeout; the exit signal tells them apart."""
        assert self._child is not None
        if self._timed_out:
            return f"TimeoutError: the code ran past {self._config.timeout_s:g} s; process killed"
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._child.proc.wait(), 1.0)
        if self._child.proc.returncode in (-signal.SIGXCPU, -signal.SIGKILL):
            self._timed_out = True
            return (f"TimeoutError: the code used its {self._config.cpu_s} CPU seconds; "
                    "process killed")
        return (f"the code runner process died (exit {self._child.proc.returncode}; "
                "a resource limit was hit?)")

    def _append_output(self, text: str) -> None:
        room = self._config.max_output_bytes - self._stdout_size
        if room <= 0 or not text:
            return
        self._stdout.append(text[:room])
        self._stdout_size += min(room, len(text))

    def _on_deadline(self) -> None:
        self._timed_out = True
        if self._child is not None:
            self._child.kill()


async def _read_reply(child: _Child) -> dict[str, Any] | None:
    assert child.proc.stdout is not None
    try:
        line = await child.proc.stdout.readline()
        return json.loads(line) if line else None
    except (ValueError, asyncio.LimitOverrunError):
        child.kill()  # the child broke the protocol (or wrote past the cap)
        return None


class CodeRunnerTool:
    """Factory of `CodeRunner` runs, to register as an incremental tool:

    `registry.register("python", incremental=CodeRunnerTool(cfg), timeout_s=...)`.
    It picks the interpreter and the user once. With `prewarm`, it keeps one started
    child ready (a fresh one per run, never reused), so a run does not wait for an
    interpreter to start; `aclose()` stops it."""

    input_format = "code"

    def __init__(self, config: CodeRunnerConfig | None = None) -> None:
        self.config = config or CodeRunnerConfig()
        self._run_as = _unprivileged_ids() if self.config.drop_privileges else None
        self._interpreter = self._pick_interpreter()
        self._spare: asyncio.Task[_Child] | None = None

    def __call__(self) -> CodeRunner:
        return CodeRunner(self)

    @property
    def run_as(self) -> tuple[int, int] | None:
        return self._run_as

    @property
    def interpreter(self) -> str:
        return self._interpreter

    async def acquire(self) -> _Child:
        """A started child for one run: the warm spare when there is one."""
        spare, self._spare = self._spare, None
        child = None
        if spare is not None:
            try:
                child = await spare
            except Exception:  # a spare that failed to start, or from another event loop
                child = None
            if child is not None and child.proc.returncode is not None:
                await child.dispose()
                child = None
        if child is None:
            child = await self._spawn()
        if self.config.prewarm:
            self._spare = asyncio.create_task(self._spawn(), name="code-runner-spare")
        return child

    async def warm(self) -> None:
        """Start the spare now (e.g. at server start)."""
        if self.config.prewarm and self._spare is None:
            self._spare = asyncio.create_task(self._spawn(), name="code-runner-spare")
            with contextlib.suppress(Exception):
                await asyncio.shield(self._spare)

    async def aclose(self) -> None:
        spare, self._spare = self._spare, None
        if spare is None:
            return
        if not spare.done():
            spare.cancel()
        with contextlib.suppress(BaseException):
            await (await spare).dispose()

    async def _spawn(self) -> _Child:
        cfg = self.config
        workdir = tempfile.mkdtemp(prefix="progserve-code-")
        extra: dict[str, Any] = {}
        if self._run_as is not None:
            uid, gid = self._run_as
            os.chown(workdir, uid, gid)
            extra = {"user": uid, "group": gid, "extra_groups": []}
        os.chmod(workdir, 0o700)
        limits = {
            "RLIMIT_CPU": cfg.cpu_s,
            "RLIMIT_AS": cfg.memory_mb * 1024 * 1024,
            "RLIMIT_FSIZE": cfg.file_size_mb * 1024 * 1024,
            "RLIMIT_NOFILE": cfg.open_files,
            "RLIMIT_CORE": 0,
            "RLIMIT_NPROC": 0,
        }
        try:
            proc = await asyncio.create_subprocess_exec(
                self._interpreter, "-I", "-S", "-c", _DRIVER,
                json.dumps(limits), str(cfg.max_output_bytes),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                cwd=workdir,
                env={},
                start_new_session=True,
                close_fds=True,
                limit=4 * cfg.max_output_bytes + 65536,
                **extra,
            )  # fmt: skip
        except BaseException:
            shutil.rmtree(workdir, ignore_errors=True)
            raise
        child = _Child(proc, workdir)
        try:
            ready = await asyncio.wait_for(_read_reply(child), cfg.timeout_s)
            if ready is None or not ready.get("ready"):
                raise OSError(await _stderr_of(proc) or "the child exited")
        except BaseException:
            await child.dispose()
            raise
        return child

    def _pick_interpreter(self) -> str:
        candidates = [self.config.python] if self.config.python else []
        candidates += [sys.executable, os.path.realpath(sys.executable)]
        candidates += [p for p in (shutil.which("python3"), "/usr/bin/python3") if p]
        for path in dict.fromkeys(candidates):
            if os.path.isfile(path) and self._usable(path):
                return path
        raise RuntimeError(
            "no Python interpreter the code runner's user can execute; set tools.code_runner.python"
        )

    def _usable(self, path: str) -> bool:
        """The unprivileged user must be able to reach and execute the interpreter."""
        if self._run_as is None:
            return os.access(path, os.X_OK)
        return all(self._reachable(p) for p in {os.path.abspath(path), os.path.realpath(path)})

    def _reachable(self, path: str) -> bool:
        assert self._run_as is not None
        uid, gid = self._run_as
        try:
            if not _others_may(os.stat(path), uid, gid, 0o005):
                return False
        except OSError:
            return False
        parent = os.path.dirname(path)
        while True:
            try:
                if not _others_may(os.stat(parent), uid, gid, 0o001):
                    return False
            except OSError:
                return False
            if parent == "/":
                return True
            parent = os.path.dirname(parent)


async def _stderr_of(proc: asyncio.subprocess.Process) -> str:
    if proc.stderr is None:
        return ""
    with contextlib.suppress(Exception):
        data = await asyncio.wait_for(proc.stderr.read(4096), 1.0)
        return data.decode(errors="replace").strip()
    return ""


def _others_may(st: os.stat_result, uid: int, gid: int, bits: int) -> bool:
    if st.st_uid == uid:
        return (st.st_mode >> 6) & bits == bits
    if st.st_gid == gid:
        return (st.st_mode >> 3) & bits == bits
    return st.st_mode & bits == bits


def _unprivileged_ids() -> tuple[int, int] | None:
    """`nobody`'s ids when the server is root; None when it is not (nothing to drop)."""
    if os.geteuid() != 0:
        return None
    try:
        user = pwd.getpwnam("nobody")
    except KeyError:
        return None
    try:
        gid = grp.getgrnam("nogroup").gr_gid
    except KeyError:
        gid = user.pw_gid
    return user.pw_uid, gid

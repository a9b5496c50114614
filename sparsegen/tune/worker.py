"""Child processes that run candidate work: a crash, hang or out-of-memory in a candidate is
a failed trial with its reason, never a dead tuner.

A ChildWorker is a long-lived `python -m sparsegen.tune.worker` process (imports and CUDA
context are paid once, inputs stay on the GPU between candidates) that answers one request
at a time: call `module:function` with a payload. The parent enforces a time limit per
request; a child that dies, hangs or poisons its CUDA context is killed (with its whole
process group: nvcc and friends too) and a fresh one is started for the next request.
The child's stdout and stderr go to a log file whose tail becomes the failure reason.

Requests and replies are length-prefixed pickles on a private pipe, so whatever a compiler
prints never corrupts the protocol.
"""
from __future__ import annotations

import contextlib
import importlib
import os
import pickle
import queue
import select
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_LEN = struct.Struct("!Q")
# messages of CUDA errors that leave the context unusable: the child must be replaced
_FATAL_MARKERS = ("illegal memory access", "unspecified launch failure", "device-side assert",
                  "CUDA error", "cudaErrorLaunchFailure", "misaligned address",
                  "an illegal instruction")


@dataclass
class Outcome:
    ok: bool
    value: Any = None
    kind: str = ""     # on failure: compile, crash, timeout, oom, wrong, infeasible, error
    reason: str = ""


class CandidateError(Exception):
    """Raised in a child for a candidate that fails in a known way; `kind` names how."""

    kind = "error"

    def __init__(self, message: str, kind: str | None = None):
        super().__init__(message)
        if kind:
            self.kind = kind


def resolve(target: str):
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


# ---------------------------------------------------------------------------------------
# Parent side
# ---------------------------------------------------------------------------------------
class ChildWorker:
    def __init__(self, name: str, log_dir: str | Path | None = None,
                 env: dict | None = None, start_timeout: float = 120.0):
        self.name = name
        self.log_dir = Path(log_dir or tempfile.mkdtemp(prefix="sparsegen-workers-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        # one log per tuner process (several may share a cache dir); removed on close
        self.log_path = self.log_dir / f"{name}.{os.getpid()}.log"
        self.env = env
        self.start_timeout = start_timeout
        self.state: dict = {}   # what the current child holds (cleared on restart)
        self.starts = 0
        self._proc: subprocess.Popen | None = None

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _start(self) -> None:
        self.close()
        env = dict(os.environ if self.env is None else self.env)
        # the child imports what this process can (tests' helper modules included)
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
        log = open(self.log_path, "ab")
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "sparsegen.tune.worker"], stdin=subprocess.PIPE,
                stdout=subprocess.PIPE, stderr=log, env=env, start_new_session=True)
        finally:
            log.close()
        self.state = {}
        self.starts += 1

    def call(self, target: str, payload: Any, timeout: float) -> Outcome:
        if not self.alive:
            self._start()
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        try:
            _send(self._proc.stdin, (target, payload))
            reply = _recv(self._proc.stdout.fileno(), time.monotonic() + timeout)
        except TimeoutError:
            self._kill()
            return Outcome(False, kind="timeout",
                           reason=f"no result within {timeout:g} s (hung?); child killed")
        except (EOFError, BrokenPipeError, ConnectionError, OSError):
            code = self._reap()
            return Outcome(False, kind="crash",
                           reason=f"child {_exit_text(code)}{self._log_tail(offset)}")
        status, value = reply
        if status == "ok":
            return Outcome(True, value=value)
        kind, message, fatal = value
        if fatal:
            self._reap()  # the child exits by itself; a fresh one serves the next request
        return Outcome(False, kind=kind, reason=message)

    def _log_tail(self, offset: int, lines: int = 6) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(offset)
                text = f.read().decode(errors="replace")
        except OSError:
            return ""
        tail = [ln.strip() for ln in text.splitlines() if ln.strip()][-lines:]
        return (": " + " | ".join(tail))[:600] if tail else ""

    def _kill(self) -> None:
        if self._proc is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self._proc.pid, signal.SIGKILL)
            self._reap()

    def _reap(self) -> int | None:
        proc, self._proc = self._proc, None
        self.state = {}
        if proc is None:
            return None
        for stream in (proc.stdin, proc.stdout):
            with contextlib.suppress(OSError):
                stream.close()
        try:
            return proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            return proc.wait()

    def close(self) -> None:
        """Ask the child to exit (kill it if it does not) and remove its log."""
        if self._proc is not None:
            with contextlib.suppress(OSError, ValueError):
                _send(self._proc.stdin, None)
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
            self._kill()
        with contextlib.suppress(OSError):
            self.log_path.unlink()


class WorkerPool:
    """A fixed set of ChildWorkers shared by threads: take one, use it, give it back."""

    def __init__(self, size: int, name: str, log_dir: str | Path | None = None):
        self.workers = [ChildWorker(f"{name}-{i}", log_dir) for i in range(max(1, size))]
        self._free: queue.Queue = queue.Queue()
        for w in self.workers:
            self._free.put(w)

    @contextlib.contextmanager
    def worker(self):
        w = self._free.get()
        try:
            yield w
        finally:
            self._free.put(w)

    def close(self) -> None:
        threads = [threading.Thread(target=w.close) for w in self.workers]
        for t in threads:
            t.start()
        for t in threads:
            t.join()


def _exit_text(code: int | None) -> str:
    if code is None:
        return "is gone"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        hint = " (out of host memory?)" if -code == signal.SIGKILL else ""
        return f"crashed with {name}{hint}"
    return f"exited with code {code}"


def _send(stream, obj) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(_LEN.pack(len(data)) + data)
    stream.flush()


def _recv(fd: int, deadline: float | None):
    (n,) = _LEN.unpack(_read_exact(fd, _LEN.size, deadline))
    return pickle.loads(_read_exact(fd, n, deadline))


def _read_exact(fd: int, n: int, deadline: float | None) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise TimeoutError
        chunk = os.read(fd, n - len(buf))
        if not chunk:
            raise EOFError
        buf += chunk
    return bytes(buf)


# ---------------------------------------------------------------------------------------
# Child side
# ---------------------------------------------------------------------------------------
def classify(exc: BaseException) -> tuple[str, bool]:
    """(kind, fatal) of an exception raised by candidate work."""
    names = {c.__name__ for c in type(exc).__mro__}
    text = str(exc)
    if "OutOfMemoryError" in names or isinstance(exc, MemoryError) or "out of memory" in text:
        return "oom", False
    if isinstance(exc, CandidateError):
        return exc.kind, False
    if "CompileError" in names:
        return "compile", False
    if any(m in text for m in _FATAL_MARKERS) or "AcceleratorError" in names:
        return "crash", True
    return "error", False


def _serve() -> None:
    # keep the protocol pipe private; everything printed goes to the log (stderr)
    proto_out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    proto_in = sys.stdin.buffer.raw.fileno() if hasattr(sys.stdin.buffer, "raw") else 0
    while True:
        try:
            msg = _recv(proto_in, None)
        except (EOFError, OSError):
            return  # the parent is gone
        if msg is None:
            return
        target, payload = msg
        try:
            reply = ("ok", resolve(target)(payload))
            fatal = False
        except BaseException as e:  # noqa: BLE001 - every failure is reported, none kills us
            kind, fatal = classify(e)
            first = " ".join(str(e).split())
            reply = ("error", (kind, f"{type(e).__name__}: {first}"[:800], fatal))
            import traceback
            traceback.print_exc()
        try:
            _send(proto_out, reply)
        except (BrokenPipeError, OSError):
            return
        if fatal:
            os._exit(3)


# ---------------------------------------------------------------------------------------
# Compile targets (run in CPU workers)
# ---------------------------------------------------------------------------------------
def make_adapter(task: dict):
    """The backend adapter of a candidate task (adapter, and the static parameters' class
    where it is not DecodeStatic, given as 'module:Class')."""
    from ..codegen.decode_api import DecodeStatic

    cls = resolve(task["adapter"])
    static_cls = resolve(task["static_cls"]) if task.get("static_cls") else DecodeStatic
    build_dir = Path(task["build_dir"]) if task.get("build_dir") else None
    return cls(static_cls(**task["static"]), dict(task["config"]), build_dir)


def compile_candidate(task: dict) -> dict:
    """Render and compile one candidate for sm_90 on the CPU; returns the compiler's facts
    (registers, spills, shared memory), without the binaries."""
    adapter = make_adapter(task)
    adapter.render()
    facts = adapter.compile_sm90() or {}
    facts.update(_prewarm_tilelang(adapter, task.get("workload") or {}))
    return _small_facts(facts)


def _prewarm_tilelang(adapter, workload: dict) -> dict:
    """Build the TileLang kernels the GPU child will compile for this candidate at its
    workload (an adapter's `tilelang_jobs`) into TileLang's disk cache: the child then loads
    each in ~0.2 s instead of compiling it for ~10 s while it holds the GPU. A failure here
    is only noted: the child's own compile reports it as the candidate's failure."""
    jobs_of = getattr(adapter, "tilelang_jobs", None)
    if jobs_of is None or workload.get("kind") != "rule":
        return {}
    from ..codegen.tilelang_build import SM90_TARGET, build_job

    jobs = jobs_of(workload["batch"], workload["seq_len"])
    try:
        for job in jobs:
            build_job(job, SM90_TARGET["arch"])
    except Exception as e:  # TileLang / TVM / nvcc fail in many types
        return {"tilelang_prewarm": f"failed: {type(e).__name__}: {str(e)[:200]}"}
    return {"tilelang_prewarm": len(jobs)}


def _small_facts(obj):
    if isinstance(obj, dict):
        return {str(k): _small_facts(v) for k, v in obj.items()
                if not str(k).startswith("_") and not isinstance(v, (bytes, bytearray))}
    if isinstance(obj, (list, tuple)):
        return [_small_facts(v) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float)):
        return obj
    return str(obj)[:200]


if __name__ == "__main__":
    # serve from the imported module, not __main__: exception classes must be the ones
    # candidate code raises (sparsegen.tune.worker.CandidateError)
    from sparsegen.tune import worker

    worker._serve()

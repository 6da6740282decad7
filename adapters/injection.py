"""Driver-injection adapter: runs `FAILOVER_VIRTIO_INJECT_COMMAND` with the device path and
the job id appended as separate arguments. Never through a shell; bounded by a timeout; every
output line is handed to the caller (it becomes a `LogRecorded` event).

One run per device at a time: a run holds an exclusive lock (flock) on a file of its device in
`FAILOVER_INJECT_LOCK_DIR`, and the command inherits it, so the lock lasts as long as the
command (and whatever it started) does, even past the process that started it (killed with
SIGKILL, its step resumed elsewhere): a second run on that device waits for the first to end
instead of writing the same disk at the same time."""

from __future__ import annotations

import asyncio
import collections
import fcntl
import os
import signal
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

from statemachine.errors import StepError

from .cloudstack import Timer

_CHUNK = 65536
_MAX_LINE = 2000  # characters of one output line handed over
_MAX_TAIL = 8000  # characters of the output's tail in an error message
_LOCK_POLL = 0.25  # seconds between two tries of a device's lock held by another run


class InjectionFailed(StepError):
    pass


class InjectionScript:
    """`statemachine.ports.InjectionPort` running a local program."""

    def __init__(self, argv: Sequence[str], *, timeout: float, observe: Timer | None = None,
                 lock_dir: str | None = None) -> None:
        self._argv = list(argv)
        self._timeout = timeout
        self._observe = observe or (lambda *a: None)
        self.lock_dir = Path(lock_dir or Path(tempfile.gettempdir()) / "failover-inject")

    async def inject(self, device_path: str, job_id: str, on_line: Callable[[str], Awaitable[None]]) -> None:
        lock = await self._lock(device_path, on_line)
        try:
            await self._run(lock, device_path, job_id, on_line)
        finally:
            os.close(lock)  # (the command's copy, if it still runs, keeps the lock)

    async def _lock(self, device_path: str, on_line: Callable[[str], Awaitable[None]]) -> int:
        """An open file of the device's lock, locked; waits (up to the timeout) for a run that
        holds it to end."""
        path = self.lock_dir / f"{device_path.strip('/').replace('/', '_') or 'device'}.lock"
        try:
            self.lock_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise InjectionFailed("DRIVER_INJECTION_NOT_RUN",
                                  f"cannot open the injection's lock file {path}: {exc.strerror}; check "
                                  "FAILOVER_INJECT_LOCK_DIR (a directory serve can write)") from exc
        deadline = time.monotonic() + self._timeout
        told = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return fd
            except BlockingIOError:
                pass
            if time.monotonic() >= deadline:
                os.close(fd)
                raise InjectionFailed(
                    "DRIVER_INJECTION_BUSY",
                    f"an earlier run of the injection command on {device_path} still holds {path} after "
                    f"{self._timeout:.0f} s (it outlived the process that started it); find it on the appliance "
                    f"(fuser -v {path}), let it end or kill it, then retry the failover")
            if not told:
                told = True
                await on_line(f"waiting for an earlier run of the injection command on {device_path} to end "
                              f"(it holds {path}: it outlived the process that started it)")
            await asyncio.sleep(_LOCK_POLL)

    async def _run(self, lock: int, device_path: str, job_id: str,
                   on_line: Callable[[str], Awaitable[None]]) -> None:
        argv = [*self._argv, device_path, job_id]
        began = time.monotonic()
        tail: collections.deque[str] = collections.deque(maxlen=20)
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT, start_new_session=True, pass_fds=(lock,))
        except OSError as exc:
            self._observe("injection", "inject", "error", time.monotonic() - began)
            raise InjectionFailed("DRIVER_INJECTION_NOT_RUN",
                                  f"cannot run the injection command {argv[0]!r}: {exc.strerror}; check "
                                  "FAILOVER_VIRTIO_INJECT_COMMAND") from exc

        async def emit(line: bytes) -> None:
            text = line.decode("utf-8", "replace").rstrip()
            if len(text) > _MAX_LINE:  # it becomes a LogRecorded event and a TEXT column
                text = f"{text[:_MAX_LINE]}... ({len(text) - _MAX_LINE} more characters)"
            if text:
                tail.append(text)
                await on_line(text)

        async def pump() -> None:
            # split the lines here: StreamReader.readline raises ValueError on a line over
            # its 64 KiB limit (a progress bar redrawn with \r, say)
            assert proc.stdout is not None
            pending = b""
            while chunk := await proc.stdout.read(_CHUNK):
                *lines, pending = (pending + chunk).split(b"\n")
                if len(pending) >= _CHUNK:  # no end of line in sight: hand it over as it is
                    lines.append(pending)
                    pending = b""
                for line in lines:
                    await emit(line)
            if pending:
                await emit(pending)

        try:
            await asyncio.wait_for(asyncio.gather(pump(), proc.wait()), self._timeout)
        except TimeoutError:
            _kill(proc)
            await proc.wait()
            self._observe("injection", "inject", "error", time.monotonic() - began)
            raise InjectionFailed("DRIVER_INJECTION_TIMEOUT",
                                  f"the injection command did not finish within {self._timeout:.0f} s and was "
                                  "killed; raise FAILOVER_INJECT_TIMEOUT_SECONDS or check the appliance. "
                                  f"Last output: {_tail(tail)}") from None
        except BaseException:
            _kill(proc)
            raise
        ok = proc.returncode == 0
        self._observe("injection", "inject", "ok" if ok else "error", time.monotonic() - began)
        if not ok:
            raise InjectionFailed("DRIVER_INJECTION_FAILED",
                                  f"the injection command exited with status {proc.returncode}. "
                                  f"Last output: {_tail(tail)}")


def _kill(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _tail(tail: collections.deque[str]) -> str:
    text = " | ".join(tail) or "(none)"
    return text if len(text) <= _MAX_TAIL else "..." + text[-_MAX_TAIL:]

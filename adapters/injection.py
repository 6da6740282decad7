"""Driver-injection adapter: runs `FAILOVER_VIRTIO_INJECT_COMMAND` with the device path and
the job id appended as separate arguments. Never through a shell; bounded by a timeout; every
output line is handed to the caller (it becomes a `LogRecorded` event).

One run per device at a time: the command runs under util-linux `flock`, holding an exclusive
lock on a file of its device in `FAILOVER_INJECT_LOCK_DIR` for as long as the command runs,
even past the process that started it (killed with SIGKILL, its step resumed elsewhere): a
second run on that device waits for the first to end instead of writing the same disk at the
same time, and so does the undo of the command's writes (`wait_idle`)."""

from __future__ import annotations

import asyncio
import collections
import fcntl
import os
import shutil
import signal
import stat
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

from statemachine.errors import StepError

from .cloudstack import Timer

_CHUNK = 65536
_MAX_LINE = 2000  # characters of one output line handed over
_MAX_TAIL = 8000  # characters of the output's tail in an error message
_LOCK_POLL = 0.25  # seconds between two looks at a device's lock held by another run
_TERM_GRACE = 10.0  # seconds a run has to end after SIGTERM before its process group is killed
_CONFLICT = 213  # `flock`'s exit status when the lock is taken (a status the command is unlikely to use)


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
        self._flock = shutil.which("flock")

    def lock_file(self, device_path: str) -> Path:
        """The device's lock file (one per device, whatever path names it)."""
        real = os.path.realpath(device_path)
        return self.lock_dir / f"{real.strip('/').replace('/', '_') or 'device'}.lock"

    async def inject(self, device_path: str, job_id: str, on_line: Callable[[str], Awaitable[None]]) -> None:
        deadline = time.monotonic() + self._timeout
        while True:
            await self._until_free(device_path, deadline, on_line)
            if await self._run(device_path, job_id, on_line):
                return
            # (another run took the device between the look and the start: wait for it too)
            if time.monotonic() >= deadline:
                raise InjectionFailed(
                    "DRIVER_INJECTION_FAILED",
                    f"the injection command exited with status {_CONFLICT} and no output again and again (the "
                    f"status `flock` gives when the device's lock is taken); check the command")
            await asyncio.sleep(_LOCK_POLL)

    async def wait_idle(self, device_path: str, on_line: Callable[[str], Awaitable[None]]) -> None:
        """Until no run of the command holds the device (a run that outlived a killed serve):
        what undoes the command's writes waits for it to end first."""
        await self._until_free(device_path, time.monotonic() + self._timeout, on_line)

    async def _until_free(self, device_path: str, deadline: float, on_line: Callable[[str], Awaitable[None]]) -> None:
        """Until the device's lock is free (looked at, not kept: the run takes it with `flock`);
        a run that holds it past `deadline` fails the step, naming the file."""
        path = self.lock_file(device_path)
        fd = self._open(path)
        try:
            told = False
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    return
                except BlockingIOError:
                    pass
                if time.monotonic() >= deadline:
                    raise InjectionFailed(
                        "DRIVER_INJECTION_BUSY",
                        f"a run of the injection command on {device_path} still holds {path} after "
                        f"{self._timeout:.0f} s (it outlived the process that started it); find it on the appliance "
                        f"(fuser -v {path}), let it end or kill it, then retry")
                if not told:
                    told = True
                    await on_line(f"waiting for an earlier run of the injection command on {device_path} to end "
                                  f"(it holds {path}: it outlived the process that started it)")
                await asyncio.sleep(_LOCK_POLL)
        finally:
            os.close(fd)  # (the lock, if taken, goes with it)

    def _not_runnable(self) -> str | None:
        """Why the command cannot be started here (None: it can)."""
        if self._flock is None:
            return ("`flock` (util-linux) is not installed: it holds the device's lock for as long as the "
                    "injection command runs; install util-linux")
        if not self._argv or shutil.which(self._argv[0]) is None:
            return (f"cannot run the injection command {self._argv[0] if self._argv else ''!r}: no such executable "
                    "file; check FAILOVER_VIRTIO_INJECT_COMMAND")
        return None

    def problem(self) -> str | None:
        """Why no injection could run on this machine now (None: one could): the command, `flock`,
        the lock directory (`failoverctl check`). Nothing is made: a directory made by whoever
        runs the check would be theirs, not serve's user's."""
        if (problem := self._not_runnable()) is not None:
            return problem
        try:
            return self._lock_dir_problem()
        except OSError as exc:  # (a directory on the way this user may not look into)
            return (f"cannot look at the injection's lock directory {self.lock_dir}: {exc.strerror}; check "
                    "FAILOVER_INJECT_LOCK_DIR (a directory serve's user can write)")

    def _lock_dir_problem(self) -> str | None:
        if not self.lock_dir.exists():
            parent = next((d for d in self.lock_dir.parents if d.exists()), None)
            if parent is None or not os.access(parent, os.W_OK | os.X_OK):
                return (f"the injection's lock directory {self.lock_dir} does not exist and {parent} is not writable "
                        "here; create it for serve's user, or point FAILOVER_INJECT_LOCK_DIR at one")
            return None
        return self._not_own(self.lock_dir) or (
            None if os.access(self.lock_dir, os.W_OK | os.X_OK) else
            f"the injection's lock directory {self.lock_dir} is not writable here; check FAILOVER_INJECT_LOCK_DIR")

    @staticmethod
    def _not_own(directory: Path) -> str | None:
        """Why `directory` is not fit to hold the locks (None: it is): a directory of this user's
        own that no one else can write."""
        st = os.lstat(directory)  # (a symbolic link is not the user's own directory)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o022:
            return (f"the injection's lock directory {directory} is not this user's own (owner uid {st.st_uid}, "
                    f"mode {st.st_mode & 0o777:o}); point FAILOVER_INJECT_LOCK_DIR at a directory only serve's user "
                    "can write")
        return None

    def _open(self, path: Path) -> int:
        try:
            self.lock_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            if (problem := self._not_own(self.lock_dir)) is not None:
                raise InjectionFailed("DRIVER_INJECTION_NOT_RUN", problem)
            return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        except OSError as exc:
            raise InjectionFailed("DRIVER_INJECTION_NOT_RUN",
                                  f"cannot open the injection's lock file {path}: {exc.strerror}; check "
                                  "FAILOVER_INJECT_LOCK_DIR (a directory serve can write)") from exc

    async def _run(self, device_path: str, job_id: str, on_line: Callable[[str], Awaitable[None]]) -> bool:
        """One run under the device's lock; False if another run took the lock first."""
        argv = [*self._argv, device_path, job_id]
        if (problem := self._not_runnable()) is not None:  # (`flock` would say so only in its output)
            self._observe("injection", "inject", "error", 0.0)
            raise InjectionFailed("DRIVER_INJECTION_NOT_RUN", problem)
        assert self._flock is not None
        # `flock` takes the lock, runs the command as its child and keeps the lock until it
        # ends: also past serve's own end (SIGKILL), and whatever descriptors the command
        # (sudo, say) closes
        locked = [self._flock, "--exclusive", "--nonblock", "--conflict-exit-code", str(_CONFLICT),
                  str(self.lock_file(device_path)), *argv]
        began = time.monotonic()
        tail: collections.deque[str] = collections.deque(maxlen=20)
        try:
            proc = await asyncio.create_subprocess_exec(
                *locked, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT, start_new_session=True)
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
            _stop(proc)
            try:  # (bounded: a descendant holding the output open keeps `wait` from returning)
                await asyncio.wait_for(proc.wait(), _TERM_GRACE + 5)
            except TimeoutError:
                pass
            self._observe("injection", "inject", "error", time.monotonic() - began)
            raise InjectionFailed("DRIVER_INJECTION_TIMEOUT",
                                  f"the injection command did not finish within {self._timeout:.0f} s and was "
                                  "killed; raise FAILOVER_INJECT_TIMEOUT_SECONDS or check the appliance. "
                                  f"Last output: {_tail(tail)}") from None
        except BaseException:
            _stop(proc)  # (its SIGKILL, if it comes to that, is scheduled: this task is ending)
            raise
        if proc.returncode == _CONFLICT and not tail:
            return False  # `flock` found the lock taken: the command never ran
        ok = proc.returncode == 0
        self._observe("injection", "inject", "ok" if ok else "error", time.monotonic() - began)
        if not ok:
            raise InjectionFailed("DRIVER_INJECTION_FAILED",
                                  f"the injection command exited with status {proc.returncode}. "
                                  f"Last output: {_tail(tail)}")
        return True


def _stop(proc: asyncio.subprocess.Process) -> None:
    """SIGTERM to the command (`flock`'s children: sudo passes it on), not to `flock`, which
    would die of it at once and free the device's lock: `flock` holds it until its command has
    ended, so a command that ends on SIGTERM never leaves the lock free while it still writes.
    SIGKILL to the whole process group `_TERM_GRACE` seconds later, whatever is left (a Linux
    process group id is not reused while the group has members). (A command that ignores
    SIGTERM and that serve's user cannot kill, one run as root by sudo, outlives it: the
    command must end on SIGTERM.)"""
    if proc.returncode is not None:
        return
    for child in _children(proc.pid):
        try:
            os.kill(child, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            pass
    asyncio.get_running_loop().call_later(_TERM_GRACE, _signal_group, proc.pid, signal.SIGKILL)


def _children(pid: int) -> list[int]:
    """The processes whose parent is `pid` (from /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        if len(fields) > 1 and int(fields[1]) == pid:
            found.append(int(entry))
    return found


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _tail(tail: collections.deque[str]) -> str:
    text = " | ".join(tail) or "(none)"
    return text if len(text) <= _MAX_TAIL else "..." + text[-_MAX_TAIL:]

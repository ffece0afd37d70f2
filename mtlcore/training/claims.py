"""The bookkeeping files next to a run file, so that processes sharing a results folder cooperate.

`<hash>.claim`: the process training the run (JSON: host, pid, started, heartbeat). It is created atomically
(O_CREAT | O_EXCL), its heartbeat is refreshed by a background thread while the run trains, and it is removed when
the run file is written or the run fails. A claim is stale when its heartbeat is older than `stale_after` seconds,
or when it names this host and a process that no longer exists; a stale claim is taken over atomically.

`<hash>.failed.json`: the last failure of the run (error type, message, traceback, time), so that a sweep goes on
past it and a later sweep reports it instead of training it again (unless asked to retry).
"""
from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import traceback
import uuid
from pathlib import Path

log = logging.getLogger(__name__)

STALE_AFTER = 600.0  # seconds without a heartbeat after which a claim is taken over


class RunClaimed(RuntimeError):
    """Another live process is training this run."""


class RunFailed(RuntimeError):
    """The run failed before (see its `.failed.json`) and retrying was not asked for."""

    def __init__(self, path: Path, record: dict):
        self.path, self.record = path, record
        super().__init__(f"{path.name}: {record.get('type')}: {first_line(record.get('message', ''))} "
                         f"(failed at {record.get('time')}; retry with retry_failed=True or --retry-failed)")


def first_line(text: str) -> str:
    return next((line for line in str(text).splitlines() if line.strip()), "")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _is_stale(content: bytes, mtime: float, stale_after: float) -> bool:
    try:
        claim = json.loads(content)
        heartbeat, host, pid = float(claim["heartbeat"]), claim["host"], int(claim["pid"])
    except (ValueError, KeyError, TypeError):  # being written, or not a claim: judged by the file's age
        return time.time() - mtime > stale_after
    if host == socket.gethostname() and pid != os.getpid() and not _alive(pid):
        return True
    return time.time() - heartbeat > stale_after


class Claim:
    """This process's claim on a run; keeps its file descriptor, so the heartbeat never writes another's claim."""

    def __init__(self, path: Path, fd: int, stale_after: float):
        self.path, self.fd = path, fd
        now = time.time()
        self.content = {"host": socket.gethostname(), "pid": os.getpid(), "started": now, "heartbeat": now,
                        "token": uuid.uuid4().hex}
        self._write()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, args=(max(stale_after / 5, 0.05),), daemon=True,
                                        name=f"heartbeat {path.name}")
        self._thread.start()

    def _write(self) -> None:
        data = json.dumps(self.content).encode()
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, data, 0)

    def _beat(self, interval: float) -> None:
        while not self._stop.wait(interval):
            self.heartbeat()

    def heartbeat(self) -> None:
        self.content["heartbeat"] = time.time()
        try:
            self._write()
        except OSError as error:  # a full or vanished file system: the claim may go stale, training goes on
            log.warning("could not refresh the claim %s: %s", self.path, error)

    def owned(self) -> bool:
        try:
            return os.stat(self.path).st_ino == os.fstat(self.fd).st_ino
        except FileNotFoundError:
            return False

    def release(self) -> None:
        self._stop.set()
        self._thread.join()
        if self.owned():
            self.path.unlink(missing_ok=True)
        else:
            log.warning("the claim %s was taken over by another process while this one held it (its heartbeat "
                        "was older than the stale timeout); raise the timeout if epochs are slower", self.path)
        os.close(self.fd)

    def __enter__(self) -> Claim:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _create(path: Path, stale_after: float) -> Claim | None:
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o666)
    except FileExistsError:
        return None
    return Claim(path, fd, stale_after)


def acquire(path: Path, stale_after: float = STALE_AFTER) -> Claim | None:
    """Claim `path` for this process, taking over a stale claim; None when a live process holds it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    claim = _create(path, stale_after)
    if claim is not None:
        return claim
    try:
        content, mtime = path.read_bytes(), path.stat().st_mtime
    except FileNotFoundError:  # released meanwhile
        return _create(path, stale_after)
    if not _is_stale(content, mtime, stale_after):
        return None
    # Take over: move the stale file aside (only one process can), check that it is the one judged stale
    # (not a claim another process made meanwhile), then create ours.
    aside = path.with_name(f"{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.stale")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return _create(path, stale_after)
    if aside.read_bytes() != content:  # a live claim, moved by mistake: put it back unless a new one exists
        try:
            os.link(aside, path)
        except OSError:  # a new claim exists already (or no hard links here): the holder finds it lost
            pass
        aside.unlink()
        return None
    aside.unlink()
    log.warning("taking over the stale claim %s: %s", path, content.decode(errors="replace"))
    return _create(path, stale_after)


def describe(path: Path) -> str:
    try:
        claim = json.loads(path.read_bytes())
        return f"host {claim['host']} pid {claim['pid']}, heartbeat {time.time() - claim['heartbeat']:.0f} s ago"
    except (OSError, ValueError, KeyError, TypeError):
        return "a claim being written"


def record_failure(path: Path, error: BaseException) -> None:
    """Write `path` (a `.failed.json`) for `error`, atomically."""
    record = {"type": type(error).__name__, "message": str(error),
              "traceback": "".join(traceback.format_exception(type(error), error, error.__traceback__)),
              "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "timestamp": time.time(),
              "host": socket.gethostname(), "pid": os.getpid()}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, path)


def read_failure(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except ValueError:  # unreadable: a failure all the same
        return {"type": "unknown", "message": f"unreadable failure record {path.name}", "time": "?"}

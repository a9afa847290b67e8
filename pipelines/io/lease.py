"""The lease: one run per output folder (``_work/lease.json``), taken atomically, renewed while the run lives,
and checked before the run writes, deletes or publishes (see `Lease`)."""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import threading
import time
import uuid
from datetime import datetime, timezone
from typing import Any

from pipelines.errors import OutputError
from pipelines.io.commit import WORK, Progress

log = logging.getLogger(__name__)

#: Tokens of the leases this process renews now: a holder in this very process is alive while it renews.
_RENEWING: set[str] = set()


class LeaseLost(OutputError):
    """This run no longer holds its output's lease (another run took the folder over): it writes nothing more."""


def _lost_message(uri: str, why: str) -> str:
    return (
        f"this run lost the lease of output {uri}: {why}; it stops without writing or publishing anything more "
        "(the output is the other run's now: let it finish, or rerun with --resume once it has stopped)"
    )


class Lease:
    """One job per output folder: ``_work/lease.json``, created atomically (local: exclusive create; S3: a
    conditional PUT, ``If-None-Match: *``), naming its holder and its own timeout, renewed every ``timeout_s / 4``
    by a background thread with a conditional rewrite (S3 ``If-Match``), so a run that took it over is noticed.

    Whether a lease is stale is decided by its holder's rule, never the newcomer's: a lease not renewed for the
    holder's own ``timeout_s`` (written in the lease; an older lease without it: the newcomer's) is stale (its run
    was killed or cut off) and may be taken over by a resume or an overwrite; so is one whose holder ran on this
    machine and whose process is gone. A holder whose process runs on this machine is never stale, however old
    its last renewal: stop it first. Any other takeover is refused, naming the holder.
    A run whose lease was taken over notices it (its renewal fails; its commit tasks read the lease before each
    unit's files; the driver checks before it deletes, reduces or publishes) and stops without writing.
    Clocks of the machines that share an output folder are assumed to agree within a fraction of ``timeout_s``."""

    def __init__(self, progress: Progress, timeout_s: float):
        self.progress, self.timeout_s = progress, timeout_s
        self.holder = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "token": uuid.uuid4().hex,
        }
        self.holder |= _this_process()  # where its pid means this process (see `holder_alive`)
        self._tag: str | None = None
        self._lost: str | None = None
        self._last_ok = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def path(self) -> str:
        return self.progress.lease_path

    @property
    def token(self) -> str:
        return self.holder["token"]

    @property
    def uri(self) -> str:
        return self.progress.storage.uri(self.progress.out)

    def _body(self) -> bytes:
        return json.dumps(self.holder | {"renewed_at": time.time(), "timeout_s": self.timeout_s}).encode()

    def acquire(self, takeover: bool) -> None:
        """Take the lease or raise OutputError naming its holder. `takeover`: a stale lease (by its holder's
        rule, see the class) may be taken."""
        storage, uri = self.progress.storage, self.uri
        for _ in range(5):
            self._tag = storage.create_exclusive(self.path, self._body())
            if self._tag is not None:
                break
            current = storage.read_tagged(self.path)
            if current is None:  # released meanwhile: try to create it again
                continue
            data, tag = current
            other = _parse_lease(data)
            age = time.time() - _renewed_at(other)
            stale = why_stale(other, self.timeout_s, age)
            if stale is None:
                raise OutputError(
                    f"output {uri} is in use by another run ({describe_holder(other, age, self.timeout_s)}); "
                    f"{_wait_or_stop(other)}; one job writes one output folder at a time"
                )
            if not takeover:
                raise OutputError(
                    f"output {uri} holds the lease of a run that stopped ({describe_holder(other, age, self.timeout_s)}"
                    "): finish it with --resume (output.mode=resume) or start over with output.mode=overwrite"
                )
            self._tag = storage.replace_if(self.path, self._body(), tag)
            if self._tag is not None:
                log.warning(
                    "rerank: took over the lease of a run that stopped (%s; %s)",
                    describe_holder(other, age, self.timeout_s),
                    stale,
                )
                break
        else:
            raise OutputError(f"cannot take the lease of output {uri}: other runs keep changing it; retry")
        self._last_ok = time.time()
        _RENEWING.add(self.token)
        self._thread = threading.Thread(target=self._renew, name="rerank-lease", daemon=True)
        self._thread.start()

    def _renew(self) -> None:
        storage = self.progress.storage
        try:
            while not self._stop.wait(max(0.25, self.timeout_s / 4)):
                try:
                    tag = storage.replace_if(self.path, self._body(), self._tag or "")
                except OutputError as err:  # a storage hiccup: try again at the next beat, unless too long
                    log.warning("rerank: cannot renew the output lease: %s", err)
                    if time.time() - self._last_ok > self.timeout_s:
                        self._lost = f"it could not be renewed for {self.timeout_s:.0f} s ({err})"
                        return
                    continue
                if tag is None:
                    self._lost = self._taken_by()
                    log.error("rerank: lost the output lease: %s", self._lost)
                    return
                self._tag, self._last_ok = tag, time.time()
        finally:
            _RENEWING.discard(self.token)

    def _taken_by(self) -> str:
        current = self.progress.storage.read_tagged(self.path)
        other = _parse_lease(current[0]) if current else {}
        if not other:
            return "it was deleted"
        return f"another run took it over ({describe_holder(other, time.time() - _renewed_at(other), None)})"

    def check(self, verify: bool = False) -> None:
        """Raise OutputError if this run no longer holds the lease (it must not write, delete or publish).
        `verify`: read the lease file too (also when this run's renewals have been late), not only what the
        renewal thread found."""
        if self._lost is None and self._thread is not None:
            late = time.time() - self._last_ok > self.timeout_s / 2 and not self._stop.is_set()
            if verify or late:
                current = self.progress.storage.read_tagged(self.path)
                if current is None or _parse_lease(current[0]).get("token") != self.token:
                    self._lost = self._taken_by()
                elif time.time() - _renewed_at(_parse_lease(current[0])) > self.timeout_s:
                    self._lost = (
                        f"it was not renewed for longer than its timeout ({self.timeout_s:g} s), so another run may "
                        "take it over"
                    )
        if self._lost:
            raise LeaseLost(_lost_message(self.uri, self._lost))

    def stop_renewing(self) -> None:
        self._stop.set()
        _RENEWING.discard(self.token)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=30)

    def release(self) -> None:
        """Stop renewing and delete the lease if it is still this run's (a finished job's went with _work/). A
        lease found to be another run's marks this one lost (`check` says so from then on)."""
        self.stop_renewing()
        storage = self.progress.storage
        try:
            current = storage.read_tagged(self.path)
            if current is not None:
                if _parse_lease(current[0]).get("token") == self.token:
                    storage.remove(self.path)
                elif self._lost is None and self._thread is not None:
                    self._lost = self._taken_by()
            work = f"{self.progress.out}/{WORK}"
            left = storage.list_names(work, "")
            if all(n.startswith(".lease") for n in left) and storage.fs.exists(work):
                storage.remove(work)  # a run that stopped before writing anything leaves nothing behind
        except OutputError as err:
            log.warning("rerank: could not release the output lease: %s", err)


def live_lease(progress: Progress, timeout_s: float) -> dict[str, Any] | None:
    """The holder of a lease that is not stale by its holder's rule (see `Lease`; `timeout_s`: the newcomer's,
    for a lease that does not record its own): a run writing this output now; else None."""
    current = progress.storage.read_tagged(progress.lease_path)
    if current is None:
        return None
    other = _parse_lease(current[0])
    age = time.time() - _renewed_at(other)
    return other | {"age_s": age} if why_stale(other, timeout_s, age) is None else None


def check_held(progress: Progress, token: str) -> None:
    """For a run's tasks (a unit's commit), right before they write: raise OutputError unless the output's lease
    is still the run's (`token`) and not stale by its own timeout (then another run may take it over any moment).
    One small read; the run's driver, which renews the lease, checks it too."""
    uri = progress.storage.uri(progress.out)
    current = progress.storage.read_tagged(progress.lease_path)
    holder = _parse_lease(current[0]) if current else {}
    age = time.time() - _renewed_at(holder)
    if holder.get("token") != token:
        what = f"another run took it over ({describe_holder(holder, age, None)})" if holder else "it was deleted"
    elif age > holder_timeout(holder, math.inf):
        what = (
            f"it was last renewed {age:.0f} s ago, longer than its timeout ({holder_timeout(holder, math.inf):g} s), "
            "so another run may take it over"
        )
    else:
        return
    raise LeaseLost(_lost_message(uri, what))


def holder_timeout(holder: dict[str, Any], default: float) -> float:
    """The holder's own lease timeout, as written in its lease; `default` for a lease that does not record one."""
    value = holder.get("timeout_s")
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0 and math.isfinite(value):
        return float(value)
    return default


def why_stale(holder: dict[str, Any], default_timeout_s: float, age: float) -> str | None:
    """Why a lease may be taken over (by its holder's rule), or None when it may not: its holder's process is
    gone from this machine; or its holder runs on another machine (or is this process's, no longer renewing) and
    it was not renewed for the holder's own timeout (`default_timeout_s` for a lease without one). A holder whose
    process runs on this machine is never stale."""
    alive = holder_alive(holder)
    if alive is True:
        return None
    if alive is False:
        return "its process is gone from this machine"
    timeout = holder_timeout(holder, default_timeout_s)
    if age > timeout:
        return f"not renewed for {age:.0f} s, longer than its timeout of {timeout:g} s"
    return None


def holder_alive(holder: dict[str, Any]) -> bool | None:
    """True when the lease's holder runs on this machine now; False when it ran here and its process is gone
    (killed, or its pid now names a process started after it); None when that cannot be known here (judged by
    its renewals alone): a holder on another machine (or in another container or boot of one with this name), or
    one in this very process that no longer renews its lease."""
    pid = holder.get("pid")
    if holder.get("host") != socket.gethostname() or not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return None
    ours = _this_process()
    if any(key in holder and key in ours and holder[key] != ours[key] for key in ("boot_id", "pid_ns")):
        return None
    if pid == os.getpid():
        return True if holder.get("token") in _RENEWING else None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        pass
    except OSError:
        return None
    stat = _proc_stat(pid)
    if stat is not None:
        if stat[0] == "Z":  # a zombie: the process has ended, only its exit status is left
            return False
        if isinstance(holder.get("proc_start"), int) and holder["proc_start"] != stat[1]:
            return False  # the pid was reused by a process started later
    return True


def holder_gone(holder: dict[str, Any]) -> bool:
    """True when the lease's holder ran on this machine and its process is gone (killed): stale at once, without
    waiting for the timeout. A holder on another machine is judged by its renewals alone."""
    return holder_alive(holder) is False


def describe_holder(holder: dict[str, Any], age: float | None, default_timeout_s: float | None = None) -> str:
    """Whose lease it is: host, pid, start, last renewal, its timeout (and whether its process runs here)."""
    renewed = f", last renewed {age:.0f} s ago" if age is not None and "renewed_at" in holder else ""
    timeout = holder_timeout(holder, math.nan)
    if math.isnan(timeout):
        timeout_text = (
            f", lease timeout not recorded (taken as {default_timeout_s:g} s)" if default_timeout_s is not None else ""
        )
    else:
        timeout_text = f", lease timeout {timeout:g} s"
    alive = holder_alive(holder)
    state = {True: ", its process is running on this machine", False: ", its process is gone"}.get(alive, "")
    return (
        f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, started {holder.get('started_at', '?')}"
        f"{renewed}{timeout_text}{state}"
    )


def _wait_or_stop(holder: dict[str, Any]) -> str:
    if holder_alive(holder) is True and holder.get("pid") != os.getpid():
        return f"wait for it to finish, or stop it (pid {holder.get('pid')} on this machine)"
    return "wait for it to finish, or stop it"


def _renewed_at(holder: dict[str, Any]) -> float:
    value = holder.get("renewed_at", 0.0)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0.0


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """A process's state letter and start (clock ticks after boot, fixed for its life), from /proc (Linux); None
    where that cannot be read."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
        fields = stat[stat.rindex(")") + 2 :].split()
        return fields[0], int(fields[19])
    except (OSError, ValueError, IndexError):
        return None


def _this_process() -> dict[str, Any]:
    """What makes this process's pid unambiguous, where the system tells (Linux): the boot, the pid namespace and
    the process's start. Written in the lease; a holder whose boot or namespace differs is not judged by its pid."""
    out: dict[str, Any] = {}
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            out["boot_id"] = f.read().strip()
        out["pid_ns"] = os.readlink("/proc/self/ns/pid")
    except OSError:
        return {}
    stat = _proc_stat(os.getpid())
    if stat is not None:
        out["proc_start"] = stat[1]
    return out


def _parse_lease(data: bytes) -> dict[str, Any]:
    try:
        value = json.loads(data)
        return value if isinstance(value, dict) else {}
    except ValueError:
        return {}  # a torn or foreign file: treated as a lease renewed at time 0 (stale)

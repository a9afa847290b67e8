"""The lease: one run per output folder (``_work/lease.json``), taken atomically, renewed while the run lives,
and checked before the run publishes (see `Lease`)."""

from __future__ import annotations

import json
import logging
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


class Lease:
    """One job per output folder: ``_work/lease.json``, created atomically (local: exclusive create; S3: a
    conditional PUT, ``If-None-Match: *``), naming its holder, renewed every ``timeout_s / 4`` by a background
    thread with a conditional rewrite (S3 ``If-Match``), so a run that took it over is noticed. A lease not
    renewed for ``timeout_s`` is stale (its run was killed) and may be taken over by a resume or an overwrite; so is
    one whose holder ran on this machine and whose process is gone.
    Clocks of the machines that share an output folder are assumed to agree within a fraction of ``timeout_s``."""

    def __init__(self, progress: Progress, timeout_s: float):
        self.progress, self.timeout_s = progress, timeout_s
        self.holder = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "token": uuid.uuid4().hex,
        }
        self._tag: str | None = None
        self._lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def path(self) -> str:
        return self.progress.lease_path

    def _body(self) -> bytes:
        return json.dumps(self.holder | {"renewed_at": time.time(), "timeout_s": self.timeout_s}).encode()

    def acquire(self, takeover: bool) -> None:
        """Take the lease or raise OutputError naming its holder. `takeover`: a stale lease may be taken."""
        storage, uri = self.progress.storage, self.progress.storage.uri(self.progress.out)
        for _ in range(5):
            self._tag = storage.create_exclusive(self.path, self._body())
            if self._tag is not None:
                break
            current = storage.read_tagged(self.path)
            if current is None:  # released meanwhile: try to create it again
                continue
            data, tag = current
            other = _parse_lease(data)
            age = time.time() - other.get("renewed_at", 0.0)
            if age <= self.timeout_s and not holder_gone(other):
                raise OutputError(
                    f"output {uri} is in use by another run ({describe_holder(other, age)}); wait "
                    f"for it to finish, or stop it; one job writes one output folder at a time"
                )
            if not takeover:
                raise OutputError(
                    f"output {uri} holds the lease of a run that stopped ({describe_holder(other, age)}): finish it "
                    "with --resume (output.mode=resume) or start over with output.mode=overwrite"
                )
            self._tag = storage.replace_if(self.path, self._body(), tag)
            if self._tag is not None:
                log.warning("rerank: took over the lease of a run that stopped (%s)", describe_holder(other, age))
                break
        else:
            raise OutputError(f"cannot take the lease of output {uri}: other runs keep changing it; retry")
        self._thread = threading.Thread(target=self._renew, name="rerank-lease", daemon=True)
        self._thread.start()

    def _renew(self) -> None:
        storage = self.progress.storage
        last_ok = time.time()
        while not self._stop.wait(max(0.25, self.timeout_s / 4)):
            try:
                tag = storage.replace_if(self.path, self._body(), self._tag or "")
            except OutputError as err:  # a storage hiccup: try again at the next beat, unless too long
                log.warning("rerank: cannot renew the output lease: %s", err)
                if time.time() - last_ok > self.timeout_s:
                    self._lost = f"it could not be renewed for {self.timeout_s:.0f} s ({err})"
                    return
                continue
            if tag is None:
                current = storage.read_tagged(self.path)
                other = _parse_lease(current[0]) if current else {}
                self._lost = f"another run took it over ({describe_holder(other, None)})" if other else "it was deleted"
                log.error("rerank: lost the output lease: %s", self._lost)
                return
            self._tag, last_ok = tag, time.time()

    def check(self) -> None:
        """Raise OutputError if this run no longer holds the lease (it must not publish)."""
        if self._lost:
            raise OutputError(
                f"this run lost the lease of output {self.progress.storage.uri(self.progress.out)}: {self._lost}; "
                "it stops without publishing"
            )

    def stop_renewing(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=30)

    def release(self) -> None:
        """Stop renewing and delete the lease if it is still this run's (a finished job's went with _work/)."""
        self.stop_renewing()
        storage = self.progress.storage
        try:
            current = storage.read_tagged(self.path)
            if current is not None and _parse_lease(current[0]).get("token") == self.holder["token"]:
                storage.remove(self.path)
            work = f"{self.progress.out}/{WORK}"
            left = storage.list_names(work, "")
            if all(n.startswith(".lease") for n in left) and storage.fs.exists(work):
                storage.remove(work)  # a run that stopped before writing anything leaves nothing behind
        except OutputError as err:
            log.warning("rerank: could not release the output lease: %s", err)


def live_lease(progress: Progress, timeout_s: float) -> dict[str, Any] | None:
    """The holder of a lease renewed within timeout_s (a run writing this output now), else None."""
    current = progress.storage.read_tagged(progress.lease_path)
    if current is None:
        return None
    other = _parse_lease(current[0])
    age = time.time() - other.get("renewed_at", 0.0)
    return other | {"age_s": age} if age <= timeout_s and not holder_gone(other) else None


def holder_gone(holder: dict[str, Any]) -> bool:
    """True when the lease's holder ran on this machine and its process is gone (killed): stale at once, without
    waiting for the timeout. A holder on another machine is judged by its renewals alone."""
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return False
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def describe_holder(holder: dict[str, Any], age: float | None) -> str:
    renewed = f", last renewed {age:.0f} s ago" if age is not None else ""
    return (
        f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, started {holder.get('started_at', '?')}"
        f"{renewed}"
    )


def _parse_lease(data: bytes) -> dict[str, Any]:
    try:
        value = json.loads(data)
        return value if isinstance(value, dict) else {}
    except ValueError:
        return {}  # a torn or foreign file: treated as a lease renewed at time 0 (stale)

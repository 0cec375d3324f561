"""Claims: a cell is computed by one process at a time, whatever launched it and wherever it runs.

Resume used to be check-then-act: two launchers that both found a cell missing both computed it, and
one marked the other's live run FAILED as "left RUNNING by an interrupted process". Now a job
*claims* its cell in the store before computing it.

A claim is a registered model in MLflow's model registry named
``robustsweep-claim-<experiment id>-<cell id>-<generation>``. Registered-model names are unique in
every MLflow backend (a primary key in SQLite and PostgreSQL, passed through unchanged by the
tracking server's REST API), so creating one is an atomic compare-and-set that every store offers:
no side database, and no file lock that would not reach another machine.

* The holder tags the claim with its process identity (host, pid, start time: robustsweep.core.process)
  and beats a heartbeat tag every ``lease_s / 4`` seconds from a thread.
* A claim is *stale* when its holder is known dead (same machine: its pid no longer runs the process
  that claimed, seen at once) or, on another machine, when its heartbeat is older than its lease.
* Taking over a stale claim creates the next generation; of two processes taking over at once the
  store lets only one create it. The highest generation is the authority; older ones are deleted.
* Only the holder of a cell's claim marks the cell's RUNNING runs FAILED ("left RUNNING"): they can
  only belong to holders whose claim went stale. No live run is marked dead.
* Before its run is marked FINISHED the holder checks that the claim is still its own (a process
  stopped for longer than its lease may have lost it); release deletes the claim.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

from robustsweep.core import process

log = logging.getLogger(__name__)

PREFIX = "robustsweep-claim"
OWNER, RUN, BEAT, LEASE = "owner", "run_id", "heartbeat", "lease_s"


@dataclass(frozen=True)
class Holder:
    """Who holds a cell's claim (the highest generation)."""

    name: str
    generation: int
    owner: str  # robustsweep.core.process.identity() of the holding process
    run_id: str
    heartbeat: float  # time.time() of its last beat, by the holder's clock
    lease_s: float

    def alive(self, now: float | None = None) -> bool:
        same_host = process.running(self.owner)
        if same_host is not None:  # this machine: exact, whatever the heartbeat says
            return same_host
        return (now or time.time()) - self.heartbeat < self.lease_s

    def describe(self) -> str:
        host, pid, _ = ([*self.owner.split("|", 2), "", ""])[:3]
        beat = time.time() - self.heartbeat
        return f"pid {pid} on {host} (run {self.run_id or 'not yet created'}, heartbeat {beat:.0f} s ago)"


class ClaimLostError(RuntimeError):
    """Another process took over this cell's claim while we computed it (we were stopped for longer
    than the lease): our result is not recorded as FINISHED."""


class Claim:
    """The claim of one cell by this process. ``try_acquire`` until it returns True; ``release`` at
    the end (idempotent). While held, a daemon thread beats the heartbeat."""

    def __init__(self, client: Any, experiment_id: str, cell_id: str, lease_s: float) -> None:
        self.client, self.lease_s, self.cell_id = client, float(lease_s), cell_id
        self.prefix = f"{PREFIX}-{experiment_id}-{cell_id}-"
        self.me = process.identity()
        self.name: str | None = None  # our generation's name while held
        self.holder: Holder | None = None  # who held it when try_acquire last failed
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ reading
    def _generations(self) -> list[Holder]:
        models = self.client.search_registered_models(filter_string=f"name LIKE '{self.prefix}%'",
                                                      max_results=100)
        out = []
        for m in models:
            tags = dict(m.tags or {})
            try:
                gen = int(m.name[len(self.prefix):])
            except ValueError:
                continue
            out.append(Holder(m.name, gen, tags.get(OWNER, ""), tags.get(RUN, ""),
                              float(tags.get(BEAT, 0) or 0), float(tags.get(LEASE, self.lease_s) or 0)))
        return sorted(out, key=lambda h: h.generation)

    def top(self) -> Holder | None:
        gens = self._generations()
        return gens[-1] if gens else None

    def held(self) -> bool:
        """The highest generation is still ours."""
        top = self.top()
        return self.name is not None and top is not None and top.name == self.name

    # ------------------------------------------------------------------ acquiring
    def try_acquire(self) -> bool:
        """Claim the cell if nobody alive holds it; False (and ``self.holder``) when somebody does."""
        from mlflow.exceptions import MlflowException

        for _ in range(5):  # lost a creation race: look again
            gens = self._generations()
            top = gens[-1] if gens else None
            if top is not None and top.alive():
                self.holder = top
                return False
            name = f"{self.prefix}{(top.generation + 1) if top else 0}"
            try:
                self.client.create_registered_model(
                    name, tags={OWNER: self.me, BEAT: f"{time.time():.3f}", LEASE: f"{self.lease_s:g}",
                                RUN: ""},
                    description="robustsweep: this cell is being computed (deleted when it ends)")
            except MlflowException as e:
                if "RESOURCE_ALREADY_EXISTS" in str(e.error_code) or "already exists" in str(e).lower():
                    continue
                raise
            self.name, self.holder = name, None
            for old in gens:  # the stale generations below ours: nobody reads them any more
                with contextlib.suppress(Exception):
                    self.client.delete_registered_model(old.name)
            if top is not None:
                log.warning("took over the claim of a cell whose holder is gone: %s", top.describe())
            self._start_heartbeat()
            return True
        self.holder = self.top()
        return False

    def set_run(self, run_id: str) -> None:
        assert self.name is not None
        self.client.set_registered_model_tag(self.name, RUN, run_id)

    # ------------------------------------------------------------------ holding
    def _start_heartbeat(self) -> None:
        import mlflow

        name, uri = self.name, mlflow.get_tracking_uri()
        self._stop.clear()

        def beat() -> None:
            client = type(self.client)(uri)  # a client of its own for the thread
            failures = 0
            while not self._stop.wait(self.lease_s / 4):
                try:
                    client.set_registered_model_tag(name, BEAT, f"{time.time():.3f}")
                    failures = 0
                except Exception as e:
                    if "RESOURCE_DOES_NOT_EXIST" in str(getattr(e, "error_code", "")):
                        log.error("this cell's claim was taken over by another process (it will not be "
                                  "recorded as FINISHED here)")
                        return
                    failures += 1  # the store is briefly away: try again at the next beat
                    log.warning("claim heartbeat failed (%d in a row): %s", failures,
                                str(e).splitlines()[0][:200])

        self._thread = threading.Thread(target=beat, name="robustsweep-claim-heartbeat", daemon=True)
        self._thread.start()

    def release(self) -> None:
        """Stop beating and delete our generation (if it is still there)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        if self.name is not None:
            with contextlib.suppress(Exception):  # already taken over and deleted: nothing to release
                self.client.delete_registered_model(self.name)
            self.name = None

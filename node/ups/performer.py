"""The node as Task Performer (IHE AIW-I): claim, retrieve, run, store, complete.

One thread takes the workitems addressed to the node (node.ups.workitem.requested_model), the
highest priority and oldest first, one at a time:

1. **claim** (:meth:`UpsService.claim`): IN PROGRESS with a Transaction UID of its own; the
   subscribers get a UPS State Report;
2. **retrieve** (stage ``retrieve``): the input studies are *held* (node.pipeline.jobs.Hold:
   what a C-MOVE brings in does not become a job of its own), then brought in by C-MOVE or
   C-GET with retries (node.ups.retrieve);
3. **run** (stage ``run``): one pipeline job per input study (or per series named), created
   with the instances' arrivals in one transaction that also drops the holds; the job names the
   requested model (the selection is limited to it, and explained as always) and the Output
   Destination AEs (else the ``[export]`` routes). The pipeline's workers run it as any other
   job: stage timings, audit events, retries after a restart, the outbox;
4. **finish**: once every job is finished and every result sent, COMPLETED with the Output
   Information Sequence referencing the results (retrievable from the destinations and from
   the node), or CANCELED with the reason and a CID 9300 code when anything failed: inputs
   not retrieved, no suitable model, a job that failed, an export that went to the dead letter,
   a cancel request. Never left IN PROGRESS: every path out ends in one of the two.

A node killed on the way resumes at start: a workitem in stage ``retrieve`` retrieves again
(the holds are still there), one in stage ``run`` waits for its jobs (which the pipeline
requeues). Each restart counts an attempt; after ``[ups] max_attempts`` it is CANCELED.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import threading
import time
from collections.abc import Callable

from node.context import NodeContext
from node.pipeline import jobs, outbox
from node.storage import index
from node.storage.db import write_transaction
from node.ups import workitem
from node.ups.retrieve import RetrieveFailed, retrieve
from node.ups.service import UpsService
from node.ups.states import IN_PROGRESS
from node.ups.store import Workitem, get, save

log = logging.getLogger("modelnode.ups")

UNFINISHED_JOBS = ("pending", "selected", "running")


def owner_of(uid: str) -> str:
    """The name under which a workitem holds studies and asks for jobs."""
    return f"ups:{uid}"


class Performer:
    """The Task Performer thread; ``wake_pipeline`` tells the pipeline's workers a job is pending."""

    def __init__(self, ctx: NodeContext, service: UpsService, wake_pipeline: Callable[[], None]) -> None:
        self.ctx = ctx
        self.service = service
        self.wake_pipeline = wake_pipeline
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        service.on_work = self.wake

    def wake(self) -> None:
        self._wake.set()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="modelnode-ups-performer", daemon=True)
        self._thread.start()
        resumed = Workitem.select().where((Workitem.state == IN_PROGRESS) & (Workitem.claimed_here == True)).count()  # noqa: E712
        log.info("UPS performer started%s", f": {resumed} workitem(s) in progress resumed" if resumed else "")

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    # ------------------------------------------------------------------ the loop

    def _loop(self) -> None:
        poll = self.ctx.config.ups.poll_seconds
        while not self._stop.is_set():
            try:
                busy = self.step()
            except Exception:
                if self._stop.is_set():
                    return  # the database may be closing under us
                log.exception("UPS performer error (will retry)")
                busy = False
            if not busy:
                self._wake.wait(poll)
                self._wake.clear()

    def step(self) -> bool:
        """One round: follow the running workitems, resume one a restart interrupted, or claim
        a new one. True when it started something (look again at once)."""
        mine = list(Workitem.select().where((Workitem.state == IN_PROGRESS) & (Workitem.claimed_here == True))  # noqa: E712
                    .order_by(Workitem.started_at, Workitem.id))
        for item in mine:
            if item.stage == "run":
                self._follow(item)
        for item in mine:
            if item.stage == "retrieve" and not self._stop.is_set():
                # Left by a killed node: this start is another attempt.
                if item.attempts >= self.ctx.config.ups.max_attempts:
                    self._release(item)
                    self.service.finish(item, reason=f"interrupted {item.attempts} time(s) while retrieving its "
                                        "inputs; giving up", code=workitem.REASON_FAILURE)
                    continue
                with self.ctx.write_lock, write_transaction(self.ctx.app.db):
                    save(item, attempts=item.attempts + 1)
                log.warning("UPS %s: resuming after a restart (attempt %d)", item.uid, item.attempts)
                self._start(item)
                return True
        if self._stop.is_set():
            return False
        item = self.service.claim()
        if item is None:
            return False
        self._start(item)
        return True

    # ------------------------------------------------------------------ retrieve, then queue

    def _start(self, item: Workitem) -> None:
        """Retrieve the inputs of ``item`` and queue its jobs (stage retrieve -> run)."""
        owner = owner_of(item.uid)
        try:
            task = self.service.task_of(item.read())
        except workitem.Refused as exc:
            # Valid at N-CREATE; since then a model was removed or a peer left the configuration.
            self.service.finish(item, reason=f"the workitem can no longer be performed: {exc.reason}",
                                code=workitem.REASON_NOT_SUPPORTED)
            return
        with self.ctx.write_lock:
            jobs.hold(sorted({inp.study_uid for inp in task.inputs}), owner)
        self.service.set_progress(item, 10, "retrieving the inputs")
        t0 = time.perf_counter()
        try:
            got = []
            for inp in task.inputs:
                got.append(retrieve(self.ctx, inp))
                if self._cancel_requested(item):
                    self._release(item)
                    self.service.finish(item, reason=self._cancel_requested(item), code=workitem.REASON_UNSPECIFIED)
                    return
        except RetrieveFailed as exc:
            self._release(item)
            self.service.finish(item, reason=f"inputs not retrieved: {exc}", code=workitem.REASON_INPUTS_MISSING,
                                timings=json.dumps({"retrieve": round(time.perf_counter() - t0, 3)}))
            return
        except Exception as exc:
            if self._stop.is_set():
                return  # shutting down: resumed at the next start
            log.exception("UPS %s: retrieving its inputs", item.uid)
            self._release(item)
            self.service.finish(item, reason=f"inputs not retrieved: {type(exc).__name__}: {exc}",
                                code=workitem.REASON_FAILURE)
            return
        timings = {"retrieve": round(time.perf_counter() - t0, 3)}
        cfg = self.ctx.config
        destinations = list(task.destinations) if task.destinations is not None else None
        with self.ctx.write_lock, write_transaction(self.ctx.app.db):
            made = []
            for inp, retrieved in zip(task.inputs, got, strict=True):
                groups = ([("series", s) for s in retrieved.series_uids] if inp.series_uids
                          else [("study", inp.study_uid)])
                for group_by, key in groups:
                    job = jobs.create_requested(group_key=key, group_by=group_by, study_uid=inp.study_uid,
                                                called_ae=cfg.node.ae_title, calling_ae=item.requester, origin=owner,
                                                model=task.model, destinations=destinations)
                    made.append(job.id)
            jobs.release(owner)
            save(item, stage="run", job_ids=json.dumps(made), timings=json.dumps(timings))
        self.service.set_progress(item, 40, f"running: job(s) {', '.join(map(str, made))}")
        log.info("UPS %s: inputs retrieved in %.2f s; job(s) %s queued%s", item.uid, timings["retrieve"],
                 ", ".join(map(str, made)), f" for model {task.model}" if task.model else "")
        self.wake_pipeline()

    def _release(self, item: Workitem) -> None:
        with self.ctx.write_lock:
            jobs.release(owner_of(item.uid))

    def _cancel_requested(self, item: Workitem) -> str:
        fresh = get(item.uid)
        return fresh.cancel_requested if fresh is not None else ""

    # ------------------------------------------------------------------ follow the jobs

    def _follow(self, item: Workitem) -> None:
        """Finish ``item`` once its jobs and their exports are over (stage run)."""
        ids = item.jobs()
        rows = list(jobs.Job.select().where(jobs.Job.id.in_(ids)).order_by(jobs.Job.id))
        cancel = self._cancel_requested(item)
        if cancel:
            with self.ctx.write_lock:
                # A job not yet claimed by a worker is dropped; one running is let finish.
                (jobs.Job.update(state="failed", error="the UPS workitem was canceled", finished_at=_dt.datetime.now())
                 .where(jobs.Job.id.in_(ids) & (jobs.Job.state == "pending")).execute())
            if all(j.state not in UNFINISHED_JOBS for j in jobs.Job.select().where(jobs.Job.id.in_(ids))):
                self.service.finish(item, reason=cancel, code=workitem.REASON_UNSPECIFIED)
            return
        if len(rows) != len(ids):
            self.service.finish(item, reason=f"its job(s) {ids} are no longer in the queue", code=workitem.REASON_FAILURE)
            return
        if any(j.state in UNFINISHED_JOBS for j in rows):
            return
        held = [j for j in rows if j.state == "held"]
        if held:
            # The images contradict their header (docs/selection.md, section 4): nothing ran and
            # nothing is sent; the requester reads why, both readings with their figures.
            self.service.finish(item, reason="; ".join(f"job {j.id} {j.error}" for j in held),
                                code=workitem.REASON_NOT_SUPPORTED)
            return
        failed = [j for j in rows if j.state == "failed"]
        if failed:
            self.service.finish(item, reason="; ".join(f"job {j.id} failed: {j.error}" for j in failed),
                                code=workitem.REASON_FAILURE)
            return
        made = [uid for j in rows for uid in j.result_uids()]
        if not made:
            self.service.finish(item, reason=_no_model_reason(rows), code=workitem.REASON_NOT_SUPPORTED)
            return
        sends = list(outbox.OutboxItem.select().where(outbox.OutboxItem.job_id.in_(ids)))
        dead = [o for o in sends if o.state == "dead"]
        if dead:
            self.service.finish(item, reason="; ".join(f"export of {o.sop_uid} to {o.destination} failed: "
                                                       f"{o.last_error}" for o in dead), code=workitem.REASON_FAILURE)
            return
        if any(o.state == "pending" for o in sends):
            return
        results = _results(made)
        where = list(dict.fromkeys([o.destination for o in sends] + [self.ctx.config.node.ae_title]))
        model = (rows[0].model_name or rows[0].model_uid, f"{rows[0].model_name or 'model'} ({rows[0].model_uid})")
        timings = {**item.timing(), **_job_timings(rows)}
        self.service.finish(item, results=results, retrieve_ae=where, model=model, timings=json.dumps(timings))


def _results(sop_uids: list[str]) -> list[workitem.Result]:
    rows = (index.Instance.select(index.Instance, index.Series, index.Study).join(index.Series)
            .join(index.Study).where(index.Instance.sop_uid.in_(sop_uids)))
    found = {r.sop_uid: r for r in rows}
    return [workitem.Result(found[u].sop_class_uid, u, found[u].series.series_uid, found[u].series.study.study_uid)
            for u in sop_uids if u in found]


def _no_model_reason(rows: list[jobs.Job]) -> str:
    parts = []
    for j in rows:
        for sel in json.loads(j.selection or "[]"):
            rejected = "; ".join(f"{r['name']}: {', '.join(r['reasons'])}" for r in sel.get("rejected", []))
            parts.append(f"series {sel.get('series_uid', '?')}: {rejected or 'no model registered'}")
    return "no suitable model: " + (" | ".join(parts) if parts else "no image series")


def _job_timings(rows: list[jobs.Job]) -> dict[str, float]:
    total: dict[str, float] = {}
    for j in rows:
        for k, v in j.timing().items():
            total[k] = round(total.get(k, 0.0) + v, 4)
    return total


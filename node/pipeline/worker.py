"""From stored series to results in the PACS: scheduler, workers and exporter threads.

* The **scheduler** turns quiet series (see :mod:`node.pipeline.jobs`) into pending jobs.
* **Workers** (``pipeline.workers`` threads) claim a job, select a model for each series in it
  (the explanation is logged and kept on the job), run it with ONNX Runtime, build the SEG or SR,
  store the result locally (so C-FIND and C-MOVE find it) and queue it in the outbox.
* The **exporter** sends due outbox items by C-STORE and marks a job ``exported`` when every one
  of its results was accepted.

Everything a thread decides is in the database before it acts on it, so a node killed at any
point resumes where it was: a job mid-run is requeued (once per attempt) and the outbox still
holds what was not acknowledged.
"""

from __future__ import annotations

import io
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import pydicom
from pydicom.dataset import Dataset

from iods import model_object
from iods.anatomy import AnatomyNormaliser
from iods.card import ModelCard
from models.image_check import as_anatomy, image_readings
from node.context import NodeContext
from node.dimse.status import is_stored as status_is_stored
from node.ops import audit as audit_events
from node.ops import logsetup, metrics
from node.pipeline import jobs, outbox
from node.pipeline.selection import Selection, SeriesFacts, select
from node.storage import index
from node.storage.db import write_transaction

log = logging.getLogger("modelnode.pipeline")


def _single_threaded_blas() -> None:
    """numpy's BLAS (resampling in pre- and postprocessing) on one thread, for the whole process.

    ONNX Runtime brings its own thread pool for the model; a second, multi-threaded pool in
    OpenBLAS only wins on an idle machine (60 slices of 512 x 512 resampled in 0.085 s against
    0.10 s on one thread, 2 cores) and loses badly when anything else wants a core: its threads
    wait for each other, and the same call took 0.85 s while the node was receiving a study.
    """
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=1, user_api="blas")


@dataclass
class SeriesResult:
    series_uid: str
    selection: Selection
    result_uids: list[str]
    timings: dict[str, float]

    @property
    def held(self) -> bool:
        return self.selection.held


class Pipeline:
    def __init__(self, ctx: NodeContext, *, sender: Callable[[str, Dataset | str], int] | None = None,
                 audit: Any = None) -> None:
        from models.runtime import RuntimeSettings, SessionCache
        from node.ops.audit import AuditLog

        self.ctx = ctx
        cfg = ctx.config
        inf = cfg.inference
        self.sessions = SessionCache(RuntimeSettings(
            providers=tuple(inf.providers), intra_op_threads=inf.intra_op_threads,
            inter_op_threads=inf.inter_op_threads, batch_size=inf.batch_size,
            cache_bytes=inf.session_cache_mb << 20,
            trt_cache_dir=str(ctx.config.data_dir / "trt-cache"), trt_fp16=inf.trt_fp16,
        ))
        self.normaliser = AnatomyNormaliser(extra_synonyms=cfg.anatomy.synonyms)
        self._send = sender or self._c_store
        from iods.results import warm_up
        from node.pipeline.headstart import HeadStart
        from node.pipeline.prefetch import Prefetcher

        self.head_start = HeadStart() if cfg.pipeline.head_start else None
        self.prefetch = Prefetcher(ctx.app.store, cfg.pipeline.prefetch_mb << 20,
                                   after=self._head_start_groups if self.head_start is not None else None)
        self._running = 0  # jobs being run by the workers (a head start starts only when none is)
        self._running_lock = threading.Lock()
        # highdicom's tables of the standard load on first use (about 0.35 s): now, not in the
        # first study's latency.
        warm_up()
        _single_threaded_blas()
        # Selections and exports are audited (docs/operations.md); the node shares its log.
        self.audit = audit if audit is not None else AuditLog.from_config(cfg)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._wake = threading.Event()  # workers: a job is pending
        self._reschedule = threading.Event()  # scheduler: a series' association ended
        self._export_now = threading.Event()  # exporter: results were queued

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        cfg = self.ctx.config.pipeline
        self.prefetch.start()
        requeued, _ = jobs.reset_after_restart(cfg.max_attempts)
        targets = [("scheduler", self._scheduler_loop), ("exporter", self._exporter_loop)]
        targets += [(f"worker-{i + 1}", self._worker_loop) for i in range(cfg.workers)]
        for name, fn in targets:
            t = threading.Thread(target=fn, name=f"modelnode-{name}", daemon=True)
            t.start()
            self._threads.append(t)
        log.info("pipeline started: %d worker(s), quiet time %.1f s, %d job(s) resumed",
                 cfg.workers, cfg.quiet_seconds, requeued)

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        self._wake.set()
        self._reschedule.set()
        self._export_now.set()
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.1, deadline - time.monotonic()))
        self.prefetch.stop()
        if self.head_start is not None:
            self.head_start.clear()

    def wake(self) -> None:
        self._wake.set()

    def association_ended(self, group_keys: set[str]) -> None:
        """An association that stored images for ``group_keys`` (series or study UIDs) ended:
        their quiet time may now be running, and their pixels can be decoded meanwhile."""
        self._reschedule.set()
        self.prefetch.request(group_keys)

    # ------------------------------------------------------------------ loops

    def _scheduler_loop(self) -> None:
        # Sleeps until the earliest waiting series has been quiet long enough (or an association
        # ends, which may start a series' quiet time), so a job starts on the quiet timer rather
        # than on the next poll; poll_seconds bounds the sleep in case the database changed under
        # us (another process, a clock step).
        cfg = self.ctx.config.pipeline
        while not self._stop.is_set():
            delay = cfg.poll_seconds
            try:
                with self.ctx.write_lock:
                    created = jobs.promote_ready(cfg.quiet_seconds)
                if created:
                    self._wake.set()
                due = jobs.seconds_until_ready(cfg.quiet_seconds)
                if due is not None:
                    delay = min(delay, due + 0.005)  # (+5 ms: past the cutoff, not a hair before it)
            except Exception:
                log.exception("scheduler error (will retry)")
            self._reschedule.wait(delay)
            self._reschedule.clear()

    def _worker_loop(self) -> None:
        cfg = self.ctx.config.pipeline
        while not self._stop.is_set():
            with self.ctx.write_lock:
                job = jobs.claim_next()
            if job is None:
                self._wake.wait(cfg.poll_seconds)
                self._wake.clear()
                continue
            with self._running_lock:
                self._running += 1
            try:
                self.run_job(job)
            finally:
                with self._running_lock:
                    self._running -= 1

    def _exporter_loop(self) -> None:
        # Woken as soon as a worker queues results; the poll picks up retries whose backoff ran out.
        ex = self.ctx.config.export
        while not self._stop.is_set():
            try:
                self.export_due()
            except Exception:
                log.exception("exporter error (will retry)")
            self._export_now.wait(ex.poll_seconds)
            self._export_now.clear()

    # ------------------------------------------------------------------ one job

    def run_job(self, job: jobs.Job) -> None:
        # Every log line of this job carries its correlation id (j<id>).
        with logsetup.correlation(f"j{job.id}"):
            self._run_job(job)

    def _run_job(self, job: jobs.Job) -> None:
        t_start = time.perf_counter()
        try:
            series_rows = self._series_of(job.group_by, job.group_key)
            # A job someone asked for (a UPS workitem) may name its model and its destinations.
            request = jobs.request_of(job.id)
            decided = jobs.decision_of(request)
            results: list[SeriesResult] = []
            for series in series_rows:
                results.append(self._run_series(job, series, request.model if request is not None else "", decided))
            made = [uid for r in results for uid in r.result_uids]
            held = [r for r in results if r.held]
            timings: dict[str, float] = {}
            for r in results:
                for k, v in r.timings.items():
                    timings[k] = round(timings.get(k, 0.0) + v, 4)
            timings["total"] = round(time.perf_counter() - t_start, 4)
            if job.last_instance_at is not None:
                timings["waited_since_last_instance"] = round(
                    (job.started_at - job.last_instance_at).total_seconds(), 4) if job.started_at else 0.0
            outcome = jobs.OUTCOME_RESULT if made else jobs.OUTCOME_NO_MODEL
            selection = [{"series_uid": r.series_uid, **r.selection.to_dict()} for r in results]
            if held:
                # Held for a person: nothing of this job is exported, not even the results of
                # its other series (a study job), until someone decides (jobs retry).
                why = "; ".join(f"series {jobs.short_uid(r.series_uid)}: {r.selection.facts.contradiction.describe()}"
                                for r in held if r.selection.facts.contradiction is not None)
                with self.ctx.write_lock:
                    jobs.transition(job.id, "held", outcome=jobs.OUTCOME_CONTRADICTION, results=json.dumps(made),
                                    selection=json.dumps(selection), timings=json.dumps(timings),
                                    error=f"held for review: {why}")
                log.warning("job %d: held for review, image and header disagree: %s", job.id, why)
                return
            with self.ctx.write_lock:
                jobs.transition(job.id, "done", outcome=outcome, results=json.dumps(made),
                                selection=json.dumps(selection), timings=json.dumps(timings))
                queued = self._enqueue_exports(job, results, request) if made else 0
            if queued:
                self._export_now.set()
            if not made:
                reasons = "; ".join(f"{rej.name}: {', '.join(rej.reasons)}" for r in results for rej in r.selection.rejected)
                log.warning("job %d: no suitable model for %s %s (%s)", job.id, job.group_by,
                            jobs.short_uid(job.group_key), reasons or "no models registered")
            else:
                log.info("job %d: done in %.2f s, %d result(s), %d export(s) queued", job.id,
                         timings["total"], len(made), queued)
        except Exception as exc:
            if self._stop.is_set():
                # Shutting down under it (the database may be closing): leave the job as it is,
                # the next start requeues it.
                log.warning("job %d interrupted by shutdown; it runs again after the restart", job.id)
                return
            log.exception("job %d failed", job.id)
            with self.ctx.write_lock:
                jobs.transition(job.id, "failed", error=f"{type(exc).__name__}: {exc}")

    def _series_of(self, group_by: str, group_key: str) -> list[index.Series]:
        """The image series of a group (a series, or every series of a study)."""
        q = index.Series.select().where(index.Series.is_model == False)  # noqa: E712
        if group_by == "study":
            q = q.join(index.Study).where(index.Study.study_uid == group_key)
        else:
            q = q.where(index.Series.series_uid == group_key)
        return list(q.order_by(index.Series.series_uid))

    def _load_series(self, series: index.Series, *, keep: bool = False) -> tuple[list[Dataset], tuple[str, ...]]:
        """The series' datasets and the sorted digests of their files (prefetched ones taken,
        or only looked at with ``keep``)."""
        rows = index.Instance.select().where(index.Instance.series == series).order_by(index.Instance.sop_uid)
        store = self.ctx.app.store
        get = self.prefetch.peek if keep else self.prefetch.take
        datasets = [get(r.digest) or pydicom.dcmread(store.path(r.digest)) for r in rows]
        return datasets, tuple(sorted(r.digest for r in rows))

    def _select(self, datasets: list[Dataset], called_ae: str, model: str = "", decided: str = "") -> Selection:
        """``decided``: a person's decision on a contradiction (see :func:`jobs.decision_of`)."""
        every = self._models()
        models = every
        if model:
            # The requester named the model (name or UID): the others are not candidates. It is
            # still checked against the series like any other, and rejected with its reasons.
            models = [(uid, card) for uid, card in models if model in (uid, card.identity.name)]
        # The image check reads with every registered classifier, also when a model was named:
        # the contradiction is a fact about the series, whichever model runs.
        readings = image_readings(datasets, every, self._session, self.normaliser)
        facts = SeriesFacts.from_datasets(datasets, normaliser=self.normaliser, called_ae=called_ae,
                                          image_anatomy=as_anatomy(readings), image_readings=readings,
                                          settings=self.ctx.config.selection)
        if decided and facts.contradiction is not None:
            facts = replace(facts, decided=decided)
        return select(facts, models, self.ctx.config.selection, normaliser=self.normaliser)

    def _models(self) -> list[tuple[str, ModelCard]]:
        return [(r.uid, r.card) for r in self.ctx.app.registry.all_with_terms()]

    def _run_series(self, job: jobs.Job, series: index.Series, model: str = "", decided: str = "") -> SeriesResult:
        timings: dict[str, float] = {}
        t = time.perf_counter()
        datasets, digests = self._load_series(series)
        timings["load"] = time.perf_counter() - t
        t = time.perf_counter()
        sel = self._select(datasets, job.called_ae, model, decided)
        timings["select"] = time.perf_counter() - t
        outcome = "held" if sel.held else ("model" if sel.best else "no_model")
        metrics.SELECTIONS.labels(outcome).inc()
        self.audit.record(audit_events.SELECTION, job=job.id, series_uid=series.series_uid,
                          model_uid=sel.best.uid if sel.best else "",
                          outcome={"model": "model", "no_model": "no-suitable-model", "held": "held"}[outcome])
        c = sel.facts.contradiction
        if c is not None:
            metrics.CONTRADICTIONS.labels(c.policy).inc()
            self.audit.record(audit_events.CONTRADICTION, job=job.id, series_uid=series.series_uid,
                              outcome=sel.contradiction_action, policy=c.policy, text=c.describe(),
                              header_region=c.header_region, header_probability=c.header_probability,
                              image_region=c.image_region, image_probability=c.image_probability,
                              classifier=c.classifier, model_uid=sel.best.uid if sel.best else "")
        log.info("job %d: selection for series %s (%s, %d instance(s))%s:\n%s", job.id,
                 jobs.short_uid(series.series_uid), series.modality, len(datasets),
                 f", limited to the requested model {model}" if model else "", sel.explain())
        if sel.best is None:
            return SeriesResult(series.series_uid, sel, [], timings)
        record = self.ctx.app.registry.get(sel.best.uid)
        ahead_ok = not sel.unverified and not decided  # a head start ran under the site's policy only
        with self.ctx.write_lock:
            jobs.transition(job.id, "selected", model_uid=record.uid, model_name=record.name,
                            selection=json.dumps([{"series_uid": series.series_uid, **sel.to_dict()}]))
            jobs.transition(job.id, "running")
        t = time.perf_counter()
        ahead = (self.head_start.take(series.series_uid, digests, record.uid)
                 if self.head_start is not None and ahead_ok else None)
        if ahead is not None:
            # Same model, same files: the result computed during the quiet time (node.pipeline.headstart).
            result_ds = ahead.result
            timings.update(ahead.timings)
            timings["computed_ahead"] = 1.0
            timings["waited_for_head_start"] = time.perf_counter() - t
            log.info("job %d: result computed during the quiet time taken (%d instance(s), model %s)", job.id,
                     len(digests), record.name)
        else:
            result_ds, more = self._infer(record, datasets, job.called_ae)
            timings.update(more)
        metrics.INFERENCE_SECONDS.observe(timings["inference_total"])
        if sel.unverified:
            from iods.results import mark_unverified

            mark_unverified(result_ds, sel.unverified)
        t = time.perf_counter()
        uid = self._store_result(result_ds)
        timings["store_result"] = time.perf_counter() - t
        return SeriesResult(series.series_uid, sel, [uid], timings)

    def _infer(self, record: Any, datasets: list[Dataset], called_ae: str) -> tuple[Dataset, dict[str, float]]:
        from models.infer import infer

        # Decided here, for the job and the head start alike, from the called AE both read off the
        # same arrival: a head start taken by model and files is then also of the job's type.
        seg_type = self.ctx.config.results.segmentation_type_for(record.uid, record.name, called_ae,
                                                                 exclusive=record.card.task.exclusive)
        timings: dict[str, float] = {}
        t = time.perf_counter()
        loaded = self.sessions.get(record.uid, self._verified_onnx(self.ctx.app.registry.path(record)),
                                   self._providers_for(record))
        timings["session"] = time.perf_counter() - t
        t = time.perf_counter()
        result_ds, infer_timings = infer(datasets, record.card, record.uid, loaded,
                                         batch_size=self.ctx.config.inference.batch_size,
                                         segmentation_type=seg_type,
                                         window_batch=self.ctx.config.inference.window_batch,
                                         window_workers=self.ctx.config.inference.window_workers)
        timings.update(infer_timings)
        timings["inference_total"] = time.perf_counter() - t
        return result_ds, timings

    # ------------------------------------------------------------------ head start

    def _head_start_groups(self, keys: list[str]) -> None:
        """On the prefetcher's thread, once ``keys`` are decoded: compute their results ahead."""
        assert self.head_start is not None
        for key in keys:
            if self._stop.is_set() or self._running:
                return  # a job is using the CPU; this would only slow it down
            arrival = jobs.Arrival.get_or_none(jobs.Arrival.group_key == key)
            if arrival is None or arrival.open_associations > 0:
                continue  # already a job (it computes for itself), or more is arriving
            for series in self._series_of(arrival.group_by, key):
                self.head_start.compute(series.series_uid,
                                        lambda s=series, ae=arrival.called_ae: self._compute_ahead(s, ae))

    def _compute_ahead(self, series: index.Series, called_ae: str) -> Any:
        from node.pipeline.headstart import Ahead

        t0 = time.perf_counter()
        datasets, digests = self._load_series(series, keep=True)
        sel = self._select(datasets, called_ae)
        if sel.best is None:
            return None
        record = self.ctx.app.registry.get(sel.best.uid)
        result_ds, timings = self._infer(record, datasets, called_ae)
        log.info("head start: %s computed for series %s (%d instance(s)) in %.2f s during its quiet time",
                 record.name, jobs.short_uid(series.series_uid), len(digests), time.perf_counter() - t0)
        return Ahead(series.series_uid, digests, record.uid, result_ds, timings)

    def _session(self, uid: str):
        record = self.ctx.app.registry.get(uid)
        return self.sessions.get(uid, self._verified_onnx(self.ctx.app.registry.path(record)), self._providers_for(record))

    def _verified_onnx(self, path) -> bytes:
        # The object was verified on arrival; verify again, because the file on disk is what runs.
        payload, _ = model_object.decode(model_object.read_file(path), max_payload=self.ctx.config.models.max_payload_bytes)
        return payload

    def _providers_for(self, record) -> list[str] | None:
        for o in self.ctx.config.inference.overrides:
            if o.model in (record.uid, record.name) and o.providers:
                return o.providers
        return None

    def _store_result(self, ds: Dataset) -> str:
        return store_result(self.ctx, ds)

    # ------------------------------------------------------------------ export

    def destinations(self, job: jobs.Job, model_uid: str, model_name: str) -> list[str]:
        out: list[str] = []
        for route in self.ctx.config.export.routes:
            if route.called_ae and route.called_ae != job.called_ae:
                continue
            if route.model and route.model not in (model_uid, model_name):
                continue
            out += [d for d in route.destinations if d not in out]
        return out

    def _enqueue_exports(self, job: jobs.Job, results: list[SeriesResult], request: jobs.JobRequest | None = None) -> int:
        fresh = jobs.Job.get_by_id(job.id)
        requested = request.destination_list() if request is not None else None
        dests = requested if requested is not None else self.destinations(fresh, fresh.model_uid, fresh.model_name)
        n = 0
        for r in results:
            for uid in r.result_uids:
                inst = index.Instance.get(index.Instance.sop_uid == uid)
                for d in dests:
                    outbox.enqueue(job.id, uid, inst.digest, d)
                    n += 1
        if not dests:
            log.info("job %d: no export route matches (called AE %s, model %s); result kept locally",
                     job.id, job.called_ae, fresh.model_name)
        return n

    def export_due(self) -> int:
        ex = self.ctx.config.export
        sent = 0
        for item in outbox.due():
            path = self.ctx.app.store.path(item.digest)
            t_send = time.perf_counter()
            try:
                status = self._send(item.destination, str(path))
            except Exception as exc:  # connection refused, association rejected, aborts
                status, error = None, f"{type(exc).__name__}: {exc}"
            else:
                error = f"peer answered status 0x{status:04X}" if status is not None else ""
            with self.ctx.write_lock:
                if status is not None and status_is_stored(status):
                    outbox.mark_sent(item.id)
                    sent += 1
                    metrics.EXPORT_SECONDS.observe(time.perf_counter() - t_send)
                    self.audit.record(audit_events.RESULT_EXPORTED, job=item.job_id, sop_instance_uid=item.sop_uid,
                                      destination=item.destination, outcome="sent")
                    log.info("exported %s to %s (status 0x%04X)", item.sop_uid, item.destination, status)
                    if item.job_id and outbox.job_fully_sent(item.job_id):
                        jobs.transition(item.job_id, "exported")
                else:
                    outbox.mark_failed(item, error, base_delay=ex.base_delay_seconds,
                                       max_delay=ex.max_delay_seconds, max_age=ex.max_age_seconds)
        return sent

    def _c_store(self, destination: str, path: str) -> int:
        """One C-STORE to a configured peer; returns the status (raises when no association)."""
        from node.scu import client as scu

        peer = self.ctx.config.peer(destination)
        if peer is None:
            raise LookupError(f"export destination {destination!r} is not a configured peer")
        # One attempt, TLS when the peer has tls = true: the outbox owns retrying.
        options = outbox.export_options(self.ctx.config, peer.ae_title)
        [result] = scu.store([path], scu.Address(peer.ae_title, peer.host, peer.port), options)
        if result.status is None:
            raise RuntimeError(result.error or "no status")
        return result.status


def store_result(ctx: NodeContext, ds: Dataset) -> str:
    """Store and index a result object; returns its SOP Instance UID.

    Everything that decides about object files runs under the node's write lock, as the Storage
    SCP's does (node.dimse.store_scp): the file of the result this one replaces is removed only
    if no row references it once the new row is committed, and a file written before the lock
    is put back if a concurrent removal took the same bytes meanwhile. Outside the lock, a
    C-STORE of bytes identical to the replaced result could be indexed between the check and
    the removal, and its row would point at a file that no longer exists.
    """
    data = io.BytesIO()
    ds.save_as(data, enforce_file_format=True)
    raw = data.getvalue()
    store = ctx.app.store
    stored = store.put_bytes(raw)
    ts = str(ds.file_meta.TransferSyntaxUID)
    with ctx.write_lock:
        if not store.exists(stored.digest):
            stored = store.put_bytes(raw)  # removed meanwhile as the unreferenced twin of ours
        with write_transaction(ctx.app.db):
            _, previous = index.index_instance(ds, digest=stored.digest, size=stored.size, transfer_syntax=ts,
                                               calling_ae=ctx.config.node.ae_title)
        if previous is not None and previous.digest != stored.digest and not index.digest_in_use(previous.digest):
            store.remove(previous.digest)
    return str(ds.SOPInstanceUID)

"""The durable job queue and series completion, both in the database.

Series completion
    Every stored image instance touches an :class:`Arrival` row for its group (the series, or the
    study when the called AE title groups by study). A group is *ready* when it has been quiet for
    ``pipeline.quiet_seconds`` since its last instance **and** no association that delivered to it
    is still open. Then one :class:`Job` is created and the arrival is consumed.

Late instances
    An instance that arrives after its group's job was created opens a new arrival; when that one
    is ready, a new job runs the whole group again. Result UIDs are derived from the source series
    and the model, so the re-run's SEG/SR *replaces* the earlier result in the node and in the PACS
    instead of adding a second one.

Job states
    ``pending`` -> ``selected`` -> ``running`` -> ``done`` -> ``exported``, or ``failed``.
    A job that no model fits ends ``done`` with outcome ``no-suitable-model`` and the reasons.
    A job whose images contradict its header (``selection.on_contradiction = "hold"``) ends
    ``held`` with outcome ``contradiction``: nothing ran, nothing is exported, and the job waits
    for a person (``modelnode jobs retry ID --model X`` or ``--trust image|header``).
    A worker claims a job with a conditional UPDATE, so two workers never run the same job. At
    start-up, jobs left ``selected`` or ``running`` by a killed node go back to ``pending`` with
    their attempt counted: an interrupted job runs again, once, and a job that keeps killing the
    node stops after ``max_attempts``.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
from typing import Any

import peewee

from node.storage import index
from node.storage.db import BaseModel, database_proxy, statements, write_transaction

# Named as before node/ was split into stages, so that log filters and greps keep working.
log = logging.getLogger("node.jobs")

STATES = ("pending", "selected", "running", "done", "failed", "exported", "held")
OUTCOME_RESULT = "result"
OUTCOME_NO_MODEL = "no-suitable-model"
OUTCOME_CONTRADICTION = "contradiction"
# JobRequest.origin of a person's decision on a held job: "review:model" (run the named model on
# both readings), "review:image" or "review:header" (select on that reading).
REVIEW = "review:"


def _now() -> _dt.datetime:
    return _dt.datetime.now()


class Arrival(BaseModel):
    """Instances arriving for a group that has no job yet."""

    group_key = peewee.CharField(max_length=64, unique=True)  # series or study UID
    group_by = peewee.CharField(max_length=8, default="series")
    study_uid = peewee.CharField(max_length=64, default="")
    called_ae = peewee.CharField(max_length=16, default="")
    calling_ae = peewee.CharField(max_length=16, default="")
    first_received = peewee.DateTimeField(default=_now)
    last_received = peewee.DateTimeField(default=_now, index=True)
    instances = peewee.IntegerField(default=0)
    open_associations = peewee.IntegerField(default=0)


class Job(BaseModel):
    group_key = peewee.CharField(max_length=64, index=True)
    group_by = peewee.CharField(max_length=8, default="series")
    study_uid = peewee.CharField(max_length=64, default="")
    called_ae = peewee.CharField(max_length=16, default="")
    calling_ae = peewee.CharField(max_length=16, default="")
    state = peewee.CharField(max_length=12, default="pending", index=True)
    outcome = peewee.CharField(max_length=24, default="")
    model_uid = peewee.CharField(max_length=64, default="")
    model_name = peewee.CharField(max_length=64, default="")
    selection = peewee.TextField(default="")  # the explanation, as JSON
    instances = peewee.IntegerField(default=0)
    attempts = peewee.IntegerField(default=0)
    error = peewee.TextField(default="")
    results = peewee.TextField(default="[]")  # SOP Instance UIDs of the SEG/SR made
    timings = peewee.TextField(default="{}")  # seconds per stage
    created_at = peewee.DateTimeField(default=_now, index=True)
    last_instance_at = peewee.DateTimeField(null=True)
    started_at = peewee.DateTimeField(null=True)
    finished_at = peewee.DateTimeField(null=True)

    def timing(self) -> dict[str, float]:
        return json.loads(self.timings or "{}")

    def result_uids(self) -> list[str]:
        return json.loads(self.results or "[]")


class Hold(BaseModel):
    """A study (or series) whose arrivals another stage takes itself: :func:`promote_ready`
    leaves them alone. A UPS workitem holds the study it retrieves (node.ups.performer), so
    that the instances a C-MOVE brings in become the workitem's job, not a job of their own."""

    key = peewee.CharField(max_length=64, unique=True)  # a Study (or Series) Instance UID
    owner = peewee.CharField(max_length=80, index=True)  # who holds it, e.g. "ups:<workitem UID>"
    created_at = peewee.DateTimeField(default=_now)


class JobRequest(BaseModel):
    """What a job was asked for beyond its group, by whoever created it (a UPS workitem).

    ``model``: a model name or UID the selection is limited to ("" lets the selection choose
    among all). ``destinations``: JSON list of ``[[peers]]`` AE titles its results go to
    instead of the ``[export]`` routes (None: the routes)."""

    job_id = peewee.IntegerField(unique=True)
    origin = peewee.CharField(max_length=80, index=True)
    model = peewee.CharField(max_length=64, default="")
    destinations = peewee.TextField(null=True)

    def destination_list(self) -> list[str] | None:
        return None if self.destinations is None else json.loads(self.destinations)


# --------------------------------------------------------------------------- arrivals


def note_arrival(group_key: str, *, group_by: str, study_uid: str, called_ae: str, calling_ae: str,
                 new_association: bool) -> None:
    """Record one stored instance for ``group_key`` (call in the C-STORE transaction)."""
    now = _now()
    inc = 1 if new_association else 0
    # Plain SQL: once per stored instance, and peewee took 0.4 ms to compose this UPDATE.
    updated = statements().execute(
        'UPDATE "arrival" SET "last_received" = ?, "instances" = "instances" + 1, '
        '"open_associations" = "open_associations" + ? WHERE "group_key" = ?',
        [Arrival.last_received.db_value(now), inc, group_key])
    if not updated:
        Arrival.create(group_key=group_key, group_by=group_by, study_uid=study_uid, called_ae=called_ae,
                       calling_ae=calling_ae, first_received=now, last_received=now, instances=1,
                       open_associations=1)


def association_ended(group_keys: set[str]) -> None:
    """An association that delivered to ``group_keys`` was released or aborted."""
    if group_keys:
        # CASE rather than MAX(x, 0): SQLite's scalar MAX is GREATEST in PostgreSQL.
        decremented = peewee.Case(None, [(Arrival.open_associations > 0, Arrival.open_associations - 1)], 0)
        (Arrival.update(open_associations=decremented)
         .where(Arrival.group_key.in_(sorted(group_keys))).execute())


def promote_ready(quiet_seconds: float, now: _dt.datetime | None = None) -> list[Job]:
    """Turn every quiet group with no open association into a pending job."""
    now = now or _now()
    cutoff = now - _dt.timedelta(seconds=quiet_seconds)
    db = database_proxy.obj
    jobs = []
    with write_transaction(db):
        ready = list(Arrival.select().where((Arrival.last_received <= cutoff) & (Arrival.open_associations <= 0)
                                            & _not_held())
                     .order_by(Arrival.last_received, Arrival.group_key))
        for a in ready:
            job = Job.create(group_key=a.group_key, group_by=a.group_by, study_uid=a.study_uid, called_ae=a.called_ae,
                             calling_ae=a.calling_ae, instances=a.instances, last_instance_at=a.last_received)
            a.delete_instance()
            jobs.append(job)
            log.info("job %d: %s %s ready after %.1f s quiet (%d instance(s))", job.id, a.group_by,
                     short_uid(a.group_key), (now - a.last_received).total_seconds(), a.instances)
    return jobs


def seconds_until_ready(quiet_seconds: float, now: _dt.datetime | None = None) -> float | None:
    """When the next group with no open association becomes ready (0 if one already is);
    None when nothing is waiting for its quiet time to pass."""
    first = (Arrival.select(peewee.fn.MIN(Arrival.last_received))
             .where((Arrival.open_associations <= 0) & _not_held()).scalar())
    if first is None:
        return None
    if isinstance(first, str):  # SQLite returns the aggregate as text
        first = _dt.datetime.fromisoformat(first)
    now = now or _now()
    return max(0.0, (first - now).total_seconds() + quiet_seconds)


def _not_held() -> peewee.Expression:
    held = Hold.select(Hold.key)
    return ~(Arrival.study_uid.in_(held)) & ~(Arrival.group_key.in_(held))


# --------------------------------------------------------------------------- holds and requested jobs


def hold(keys: list[str], owner: str) -> None:
    """Keep the arrivals of ``keys`` (study or series UIDs) from becoming jobs until :func:`release`."""
    with write_transaction():
        for key in keys:
            Hold.insert(key=key, owner=owner).on_conflict_ignore().execute()


def release(owner: str) -> None:
    """Drop every hold of ``owner``; the arrivals left under them may become jobs again."""
    Hold.delete().where(Hold.owner == owner).execute()


def create_requested(*, group_key: str, group_by: str, study_uid: str, called_ae: str, calling_ae: str,
                     origin: str, model: str = "", destinations: list[str] | None = None) -> Job:
    """A pending job for a group that someone asked for (not one that arrived and went quiet).

    Takes the group's arrival, if the instances came in by C-STORE (a C-MOVE into the node):
    they belong to this job. Call inside a write transaction, under the node's write lock.
    """
    series = index.Series.select(index.Series.id, index.Series.series_uid)
    if group_by == "study":
        series = series.join(index.Study).where(index.Study.study_uid == group_key)
    else:
        series = series.where(index.Series.series_uid == group_key)
    series = list(series)
    taken = Arrival.delete().where(Arrival.group_key.in_([group_key, *(s.series_uid for s in series)])).execute()
    instances = index.Instance.select().where(index.Instance.series.in_([s.id for s in series])).count()
    job = Job.create(group_key=group_key, group_by=group_by, study_uid=study_uid, called_ae=called_ae[:16],
                     calling_ae=calling_ae[:16], instances=instances, last_instance_at=None)
    JobRequest.create(job_id=job.id, origin=origin, model=model,
                      destinations=None if destinations is None else json.dumps(destinations))
    log.info("job %d: %s %s requested by %s%s (%d arrival(s) taken)", job.id, group_by, short_uid(group_key), origin,
             f", model {model}" if model else "", taken)
    return job


def request_of(job_id: int) -> JobRequest | None:
    """What the job was asked for, if someone asked (see :class:`JobRequest`)."""
    return JobRequest.get_or_none(JobRequest.job_id == job_id)


def reset_after_restart(max_attempts: int) -> tuple[int, int]:
    """Requeue jobs a killed node left mid-way; returns (requeued, given up)."""
    db = database_proxy.obj
    with write_transaction(db):
        # No association survives a restart.
        Arrival.update(open_associations=0).execute()
        stuck = list(Job.select().where(Job.state.in_(("selected", "running"))))
        requeued = failed = 0
        for job in stuck:
            if job.attempts >= max_attempts:
                Job.update(state="failed", error=f"interrupted {job.attempts} time(s); giving up",
                           finished_at=_now()).where(Job.id == job.id).execute()
                failed += 1
            else:
                Job.update(state="pending").where(Job.id == job.id).execute()
                requeued += 1
    if requeued or failed:
        log.warning("restart: %d interrupted job(s) requeued, %d given up after %d attempts", requeued, failed, max_attempts)
    return requeued, failed


# --------------------------------------------------------------------------- claiming and transitions


def claim_next() -> Job | None:
    """Atomically take the oldest pending job (state -> selected, attempt counted)."""
    for candidate in Job.select(Job.id).where(Job.state == "pending").order_by(Job.created_at, Job.id).limit(8):
        taken = (Job.update(state="selected", attempts=Job.attempts + 1, started_at=_now(), error="")
                 .where((Job.id == candidate.id) & (Job.state == "pending")).execute())
        if taken:
            return Job.get_by_id(candidate.id)
    return None


def transition(job_id: int, state: str, **fields: Any) -> None:
    if state not in STATES:
        raise ValueError(f"unknown job state {state!r}")
    if state in ("done", "failed", "exported", "held") and "finished_at" not in fields:
        fields["finished_at"] = _now()
    Job.update(state=state, **fields).where(Job.id == job_id).execute()


def retry(job_id: int, *, model: str = "", trust: str = "") -> Job:
    """Put a finished, failed or held job back in the queue (``modelnode jobs retry``).

    ``model`` (a name or UID) limits the selection to that model and lets it run even where
    image and header disagree; ``trust`` ("image" or "header") selects on that reading. Either
    is a person's decision on a held job, kept as the job's request (origin ``review:...``).
    """
    if trust not in ("", "image", "header"):
        raise ValueError(f"trust must be 'image' or 'header', not {trust!r}")
    if model and trust:
        raise ValueError("name a model or a reading to trust, not both")
    job = Job.get_by_id(job_id)
    if job.state in ("selected", "running"):
        raise ValueError(f"job {job_id} is {job.state}; it cannot be retried while it runs")
    with write_transaction():
        if model or trust:
            request = request_of(job_id)
            origin = REVIEW + ("model" if model else trust)
            if request is None:
                JobRequest.create(job_id=job_id, origin=origin, model=model)
            else:
                JobRequest.update(origin=origin, model=model).where(JobRequest.job_id == job_id).execute()
        Job.update(state="pending", attempts=0, error="", outcome="", finished_at=None).where(Job.id == job_id).execute()
    return Job.get_by_id(job_id)


def decision_of(request: JobRequest | None) -> str:
    """A person's decision on a contradiction carried by a job's request ("" when none)."""
    if request is None or not request.origin.startswith(REVIEW):
        return ""
    return request.origin[len(REVIEW):]


def counts_by_state() -> dict[str, int]:
    rows = Job.select(Job.state, peewee.fn.COUNT(Job.id).alias("n")).group_by(Job.state)
    out = dict.fromkeys(STATES, 0)
    out.update({r.state: r.n for r in rows})
    return out


def short_uid(uid: str) -> str:
    return uid if len(uid) <= 24 else "…" + uid[-20:]

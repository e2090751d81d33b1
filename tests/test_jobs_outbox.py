"""Series completion, the durable job queue and the outbox, at the database level."""

from __future__ import annotations

import datetime as dt

import pytest

from node.pipeline import jobs, outbox

T0 = dt.datetime(2026, 11, 21, 12, 0, 0)


def arrive(key="1.2.3", new=True):
    jobs.note_arrival(key, group_by="series", study_uid="1.2", called_ae="MODELNODE", calling_ae="CT1",
                      new_association=new)


@pytest.mark.timeout(30)
def test_series_is_ready_only_after_quiet_time_and_association_end(app):
    arrive()
    arrive(new=False)
    later = dt.datetime.now() + dt.timedelta(seconds=10)
    assert jobs.promote_ready(5, now=later) == [], "association still open"
    jobs.association_ended({"1.2.3"})
    assert jobs.promote_ready(5, now=dt.datetime.now()) == [], "not quiet yet"
    [job] = jobs.promote_ready(5, now=later)
    assert job.state == "pending" and job.instances == 2 and job.group_key == "1.2.3"
    assert jobs.Arrival.select().count() == 0


@pytest.mark.timeout(30)
def test_scheduler_knows_when_the_next_series_is_due(app):
    assert jobs.seconds_until_ready(5) is None, "nothing waiting"
    arrive("1.2.3")
    assert jobs.seconds_until_ready(5) is None, "its association is still open"
    jobs.association_ended({"1.2.3"})
    last = jobs.Arrival.get(jobs.Arrival.group_key == "1.2.3").last_received
    assert jobs.seconds_until_ready(5, now=last + dt.timedelta(seconds=1)) == pytest.approx(4.0, abs=1e-3)
    assert jobs.seconds_until_ready(5, now=last + dt.timedelta(seconds=9)) == 0.0
    arrive("1.2.4")
    jobs.association_ended({"1.2.4"})
    # The earliest quiet series counts.
    assert jobs.seconds_until_ready(5, now=last + dt.timedelta(seconds=2)) == pytest.approx(3.0, abs=1e-3)


@pytest.mark.timeout(30)
def test_late_instance_makes_a_new_job(app):
    arrive()
    jobs.association_ended({"1.2.3"})
    later = dt.datetime.now() + dt.timedelta(seconds=10)
    [first] = jobs.promote_ready(5, now=later)
    arrive()  # late
    jobs.association_ended({"1.2.3"})
    [second] = jobs.promote_ready(5, now=later + dt.timedelta(seconds=10))
    assert second.id != first.id and second.group_key == first.group_key


@pytest.mark.timeout(30)
def test_claim_is_exclusive_and_counts_attempts(app):
    arrive()
    jobs.association_ended({"1.2.3"})
    jobs.promote_ready(0, now=dt.datetime.now() + dt.timedelta(seconds=1))
    job = jobs.claim_next()
    assert job.state == "selected" and job.attempts == 1
    assert jobs.claim_next() is None


@pytest.mark.timeout(30)
def test_interrupted_job_runs_again_once_then_gives_up(app):
    arrive()
    jobs.association_ended({"1.2.3"})
    jobs.promote_ready(0, now=dt.datetime.now() + dt.timedelta(seconds=1))
    job = jobs.claim_next()
    jobs.transition(job.id, "running")
    assert jobs.reset_after_restart(max_attempts=2) == (1, 0)  # the SIGKILL case
    again = jobs.claim_next()
    assert again.id == job.id and again.attempts == 2
    jobs.transition(job.id, "running")
    assert jobs.reset_after_restart(max_attempts=2) == (0, 1)
    assert jobs.Job.get_by_id(job.id).state == "failed"
    assert jobs.retry(job.id).state == "pending"


@pytest.mark.timeout(30)
def test_outbox_backoff_then_dead_letter(app):
    item = outbox.enqueue(1, "1.2.3.4", "a" * 64, "PACS")
    now = dt.datetime.now()
    assert [i.id for i in outbox.due(now)] == [item.id]
    assert outbox.mark_failed(item, "connection refused", base_delay=5, max_delay=60, max_age=3600, now=now) == "pending"
    item = outbox.OutboxItem.get_by_id(item.id)
    assert outbox.due(now) == [] and outbox.due(now + dt.timedelta(seconds=6))
    assert outbox.mark_failed(item, "refused", base_delay=5, max_delay=60, max_age=3600, now=now) == "pending"
    item = outbox.OutboxItem.get_by_id(item.id)
    assert (item.next_attempt_at - now).total_seconds() == pytest.approx(10, abs=0.01)  # doubled
    old = now + dt.timedelta(hours=2)
    assert outbox.mark_failed(item, "still refused", base_delay=5, max_delay=60, max_age=3600, now=old) == "dead"
    assert outbox.backlog() == {"pending": 0, "sent": 0, "dead": 1}
    assert not outbox.job_fully_sent(1)


@pytest.mark.timeout(30)
def test_outbox_marks_job_sent_only_when_every_item_is(app):
    a = outbox.enqueue(7, "1.1", "a" * 64, "PACS")
    b = outbox.enqueue(7, "1.2", "b" * 64, "PACS")
    outbox.mark_sent(a.id)
    assert not outbox.job_fully_sent(7)
    outbox.mark_sent(b.id)
    assert outbox.job_fully_sent(7)


@pytest.mark.timeout(30)
def test_re_enqueue_replaces_a_pending_copy(app):
    outbox.enqueue(1, "1.1", "a" * 64, "PACS")
    outbox.enqueue(2, "1.1", "b" * 64, "PACS")
    rows = list(outbox.OutboxItem.select())
    assert len(rows) == 1 and rows[0].digest == "b" * 64

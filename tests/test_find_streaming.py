"""The C-FIND engine streams: matches go out as rows are read, a chunk at a time, in a fixed order,
with memory bounded whatever the number of matches (node.dimse.query_scp.matches and the handler).

Rows are counted where they are read from the database cursor (query_scp.fetch_chunks), not
timed: what is held at any moment is the rows read minus the matches already handed on.
"""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import pytest
from pydicom.dataset import Dataset

from node.dimse import query_scp
from node.dimse.status import CANCEL, PENDING, SUCCESS

EXPLICIT = "1.2.840.10008.1.2.1"


class _Counter:
    """Wraps query_scp.fetch_chunks: counts the rows read from the cursor."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.read = 0
        library = query_scp.fetch_chunks

        def counted(cursor, size):
            for rows in library(cursor, size):
                self.read += len(rows)
                yield rows

        monkeypatch.setattr(query_scp, "fetch_chunks", counted)


def _bulk(n: int, *, series_number: str = "1") -> str:
    from node.storage.index import Instance, Patient, Series, Study

    patient = Patient.create(patient_id=f"BULK{series_number}", patient_name="Bulk^Rows")
    study = Study.create(study_uid=f"2.25.9{series_number}", patient=patient, study_date="20190101")
    series = Series.create(series_uid=f"2.25.8{series_number}", study=study, modality="OT", series_number=series_number)
    rows = [{"sop_uid": f"2.25.7{series_number}.{i}", "series": series.id, "sop_class_uid": "1.2.3", "instance_number": i,
             "transfer_syntax": EXPLICIT, "digest": "0" * 64, "size": 0} for i in range(n)]
    for i in range(0, n, 500):
        Instance.insert_many(rows[i:i + 500]).execute()
    return series.series_uid


def _query(level: str, **keys: str) -> query_scp.Query:
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for k, v in keys.items():
        setattr(ds, k, v)
    return query_scp.parse_identifier(ds, query_scp.STUDY_ROOT)


@pytest.mark.timeout(120)
def test_memory_stays_bounded_for_100000_matches(app, monkeypatch) -> None:
    series_uid = _bulk(100_000)
    counter = _Counter(monkeypatch)
    query = _query("IMAGE", SeriesInstanceUID=series_uid, SOPInstanceUID="", NumberOfSeriesRelatedInstances="")
    stream = query_scp.matches(query)
    first = next(stream)
    # The first match is out after one chunk of rows, not after all 100,000.
    assert counter.read <= query_scp._CHUNK
    assert first.instance.instance_number == 0
    assert first.computed["NumberOfSeriesRelatedInstances"] == 100_000
    held, handed = 0, 1
    for m in stream:
        handed += 1
        held = max(held, counter.read - handed)
        assert m.instance.instance_number == handed - 1  # in instance order, as they are read
    assert handed == 100_000 == counter.read
    assert held < query_scp._CHUNK


@pytest.mark.timeout(60)
def test_the_database_orders_as_the_python_key_does(app) -> None:
    from node.storage.index import Instance, Patient, Series, Study

    patients = [Patient.create(patient_id=pid, issuer=iss, patient_name=pid) for pid, iss in
                (("B", ""), ("A", "Z"), ("A", ""), ("ä", ""), ("a", ""))]
    numbers = ["10", "2", "", "abc", "-1", "+3", "01", "1", "9999999999", "1.5", "x2"]
    n = 0
    for p, date, time_ in itertools.product(patients, ("20200101", ""), ("101010", "9")):
        study = Study.create(study_uid=f"2.25.{n}", patient=p, study_date=date, study_time=time_)
        for k, number in enumerate(numbers[n % 4:n % 4 + 5]):
            series = Series.create(series_uid=f"2.25.{n}.{k}", study=study, series_number=number, modality="CT")
            for i in (3, None, 1, 20):
                Instance.create(sop_uid=f"2.25.{n}.{k}.{i}", series=series, sop_class_uid="1.2", instance_number=i,
                                transfer_syntax=EXPLICIT, digest="0" * 64, size=1)
        n += 1
    for level in ("PATIENT", "STUDY", "SERIES", "IMAGE"):
        ds = Dataset()
        ds.QueryRetrieveLevel = level
        ds.PatientID = ""
        query = query_scp.parse_identifier(ds, query_scp.PATIENT_ROOT)
        got = list(query_scp.matches(query, chunk=7))
        assert got == sorted(got, key=query_scp.sort_key(level)), level
        assert len(got) == {"PATIENT": 5, "STUDY": 20, "SERIES": 100, "IMAGE": 400}[level]


class _Assoc:
    """What the handler reads of an association (no DUL: nothing is queued to hold back)."""

    def __init__(self) -> None:
        self.requestor = SimpleNamespace(ae_title="FINDSCU", address="127.0.0.1", primitive=None)


class _Event:
    def __init__(self, identifier: Dataset, cancel_after: int | None = None) -> None:
        self.assoc = _Assoc()
        self.identifier = identifier
        self.request = SimpleNamespace(AffectedSOPClassUID="1.2.840.10008.5.1.4.1.2.2.1")
        self.context = SimpleNamespace(transfer_syntax=EXPLICIT)
        self.cancel_after = cancel_after
        self.responses = 0

    @property
    def is_cancelled(self) -> bool:
        return self.cancel_after is not None and self.responses >= self.cancel_after


@pytest.mark.timeout(60)
@pytest.mark.parametrize("encoded", [True, False], ids=["encoded", "pydicom"])
def test_the_handler_answers_as_it_reads_and_stops_at_a_cancel(app, monkeypatch, encoded: bool) -> None:
    from node.dimse.compat import find_responses

    monkeypatch.setattr(find_responses, "accepts_encoded", lambda: encoded)
    series_uid = _bulk(5000)
    counter = _Counter(monkeypatch)
    ds = Dataset()
    ds.QueryRetrieveLevel = "IMAGE"
    ds.SeriesInstanceUID = series_uid
    ds.InstanceNumber = ""
    ctx = SimpleNamespace(config=SimpleNamespace(node=SimpleNamespace(ae_title="MODELNODE")))

    event = _Event(ds, cancel_after=1200)
    statuses = []
    for status, identifier in query_scp.handle_query(event, ctx):
        if status == PENDING:
            if event.responses == 0:
                assert counter.read <= query_scp._CHUNK  # the first response before the second chunk
            assert isinstance(identifier, find_responses.EncodedIdentifier) == encoded
            event.responses += 1
        statuses.append(status)
    assert statuses[-1] == CANCEL and event.responses == 1200
    assert counter.read <= 1200 + query_scp._CHUNK  # nothing read past the chunk it stopped in

    event = _Event(ds)
    answers = [(s, i) for s, i in query_scp.handle_query(event, ctx)]
    assert [s for s, _ in answers].count(PENDING) == 5000 and answers[-1] == (SUCCESS, None)


@pytest.mark.timeout(60)
def test_queries_of_one_shape_share_their_sql_and_keep_their_own_values(app, monkeypatch) -> None:
    monkeypatch.setattr(query_scp, "_compiled_sql", {})
    _bulk(10, series_number="1")
    _bulk(20, series_number="2")
    for number, count in (("1", 10), ("2", 20), ("1", 10)):
        query = _query("IMAGE", SeriesInstanceUID=f"2.25.8{number}", SOPInstanceUID="")
        found = list(query_scp.matches(query))
        assert len(found) == count and {m.series.series_number for m in found} == {number}
    assert len(query_scp._compiled_sql) == 1  # one shape, composed once
    # Another shape (a list of UIDs, a wildcard) gets its own SQL and its own answer.
    both = _query("SERIES", SeriesInstanceUID="2.25.81\\2.25.82", Modality="")
    assert [m.series.series_number for m in query_scp.matches(both)] == ["1", "2"]
    wild = _query("STUDY", PatientID="BULK*")
    assert [m.patient.patient_id for m in query_scp.matches(wild)] == ["BULK1", "BULK2"]
    assert len(query_scp._compiled_sql) == 3

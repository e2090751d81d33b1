"""The registry: verified models indexed by their searchable fields, stored by content."""

from __future__ import annotations

from dataclasses import replace

import pytest
from cards import segmentation_card_dict
from onnx_factory import segmentation_model

from iods import model_object as mo
from iods.card import parse_card
from node.storage import index
from node.storage.registry import Filters, ModelConflict, ModelRecord, ModelTerm


def _pack(tmp_path, name="lung", version="1.0.0", onnx=None, **target):
    data = segmentation_card_dict(name=name, version=version)
    data["target"].update(target)
    card = parse_card(data)
    path = tmp_path / f"{name}-{version}.dcm"
    mo.write(mo.encode(onnx or segmentation_model(), card), path)
    return path


@pytest.mark.timeout(30)
def test_add_indexes_every_searchable_field(app, tmp_path):
    record, new = app.registry.add_file(_pack(tmp_path))
    assert new
    kinds = {(t.kind, t.value) for t in ModelTerm.select().where(ModelTerm.model == record)}
    assert ("modality", "CT") in kinds
    assert ("body_part", "CHEST") in kinds
    assert ("anatomy", "39607008") in kinds
    assert ("finding", "27925004") in kinds
    # The instance index sees the model too, so C-FIND and C-MOVE find it like any instance.
    inst = index.Instance.get(index.Instance.sop_uid == record.uid)
    assert inst.series.is_model and inst.series.modality == "CT" and inst.series.body_part == "CHEST"
    assert inst.digest == record.file_digest


@pytest.mark.timeout(30)
def test_files_are_stored_by_content_not_by_uid(app, tmp_path):
    record, _ = app.registry.add_file(_pack(tmp_path))
    path = app.registry.path(record)
    assert path.name == f"{record.file_digest}.dcm"
    assert record.uid not in str(path)
    import hashlib

    assert hashlib.sha256(path.read_bytes()).hexdigest() == record.file_digest


@pytest.mark.timeout(30)
def test_filters(app, tmp_path):
    app.registry.add_file(_pack(tmp_path, "lung-seg"))
    app.registry.add_file(_pack(tmp_path, "knee-seg", modalities=["MR"], body_parts=["KNEE"],
                                anatomy=[{"value": "72696002", "meaning": "Knee"}], findings=[]))
    names = lambda f: [r.name for r in app.registry.list(f)]  # noqa: E731
    assert names(Filters()) == ["knee-seg", "lung-seg"]
    assert names(Filters(modality="MR")) == ["knee-seg"]
    assert names(Filters(body_part="chest")) == ["lung-seg"]
    assert names(Filters(anatomy="72696002")) == ["knee-seg"]
    assert names(Filters(finding="27925004")) == ["lung-seg"]
    assert names(Filters(name="knee*")) == ["knee-seg"]
    assert names(Filters(name="seg")) == ["knee-seg", "lung-seg"]
    assert names(Filters(modality="CT", body_part="KNEE")) == []


@pytest.mark.timeout(30)
def test_same_model_twice_is_a_no_op(app, tmp_path):
    path = _pack(tmp_path)
    first, new1 = app.registry.add_file(path)
    second, new2 = app.registry.add_file(path)
    assert (new1, new2) == (True, False)
    assert first.id == second.id
    assert ModelRecord.select().count() == 1


@pytest.mark.timeout(30)
def test_same_uid_with_other_content_is_refused_and_nothing_changes(app, tmp_path):
    a = _pack(tmp_path)
    record, _ = app.registry.add_file(a)
    card = parse_card(segmentation_card_dict(uid=record.uid))
    other = tmp_path / "other.dcm"
    mo.write(mo.encode(segmentation_model(seed=7), card), other)
    with pytest.raises(ModelConflict, match="immutable"):
        app.registry.add_file(other)
    assert ModelRecord.get().payload_sha256 == record.payload_sha256
    assert app.registry.path(record).exists()


@pytest.mark.timeout(30)
def test_invalid_object_is_not_registered_or_stored(app, tmp_path):
    path = _pack(tmp_path)
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF  # inside the payload
    path.write_bytes(bytes(data))
    with pytest.raises(mo.ChecksumMismatch):
        app.registry.add_file(path)
    assert ModelRecord.select().count() == 0
    assert list(app.store.objects.rglob("*.dcm")) == []


@pytest.mark.timeout(30)
def test_new_version_links_to_its_parent(app, tmp_path):
    parent, _ = app.registry.add_file(_pack(tmp_path, version="1.0.0"))
    data = segmentation_card_dict(name="lung", version="1.1.0")
    data["provenance"]["parent_uid"] = parent.uid
    child_path = tmp_path / "child.dcm"
    mo.write(mo.encode(segmentation_model(seed=3), parse_card(data)), child_path)
    child, _ = app.registry.add_file(child_path)
    assert child.parent_uid == parent.uid
    assert child.study_uid == parent.study_uid and child.series_uid != parent.series_uid


@pytest.mark.timeout(30)
def test_remove_deletes_rows_and_file(app, tmp_path):
    record, _ = app.registry.add_file(_pack(tmp_path))
    path = app.registry.path(record)
    assert app.registry.remove(record.uid).uid == record.uid
    assert not path.exists()
    assert ModelRecord.select().count() == 0 and ModelTerm.select().count() == 0
    assert index.Instance.select().count() == 0 and index.Patient.select().count() == 0
    assert app.registry.remove(record.uid) is None


@pytest.mark.timeout(30)
def test_sqlite_runs_in_wal_mode(app):
    assert app.db.execute_sql("PRAGMA journal_mode").fetchone()[0] == "wal"


@pytest.mark.timeout(30)
def test_database_url_selects_the_backend(tmp_path):
    from node.storage.db import open_database

    db = open_database(f"sqlite:///{tmp_path}/x/registry.db")
    assert (tmp_path / "x" / "registry.db").exists()
    assert type(db).__name__ == "SqliteDatabase"
    db.close()
    from playhouse.db_url import parse

    # PostgreSQL URLs go through playhouse.db_url; parse without connecting (no server here).
    parsed = parse("postgresql://modelnode:secret@db.example:5432/registry")
    assert parsed["database"] == "registry" and parsed["host"] == "db.example"


@pytest.mark.timeout(30)
def test_replace_keeps_card_immutable_fields(seg_card):
    # A card whose uid is set explicitly is kept verbatim as the SOP Instance UID.
    card = replace(seg_card, identity=replace(seg_card.identity, uid="1.2.3.4.5"))
    assert mo.encode(segmentation_model(), card).SOPInstanceUID == "1.2.3.4.5"


@pytest.mark.timeout(30)
def test_write_transaction_waits_for_a_concurrent_writer_instead_of_failing(app):
    """A read-then-write transaction must not fail when another connection commits meanwhile
    (``models add`` from the CLI while the node stores): BEGIN IMMEDIATE makes it wait."""
    import threading

    from node.storage.db import write_transaction

    read_done, other_finished = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def storer():
        try:
            with write_transaction():
                index.Patient.select().count()
                read_done.set()
                other_finished.wait(1.0)  # the other writer is blocked meanwhile, not failing
                index.Patient.create(patient_id="A")
        except BaseException as exc:  # noqa: BLE001 (reported below)
            errors.append(exc)
        finally:
            read_done.set()

    def other_writer():
        read_done.wait(5)
        try:
            with app.db.atomic():
                index.Patient.create(patient_id="B")
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)
        finally:
            other_finished.set()

    threads = [threading.Thread(target=storer), threading.Thread(target=other_writer)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert errors == []
    assert sorted(p.patient_id for p in index.Patient.select()) == ["A", "B"]


@pytest.mark.timeout(60)
def test_catalogue_parses_each_card_once_and_follows_adds_and_removes(app, tmp_path, monkeypatch):
    from node.storage import registry as registry_module

    parsed = []
    library = registry_module.card_from_json
    monkeypatch.setattr(registry_module, "card_from_json", lambda text: parsed.append(1) or library(text))
    assert app.registry.catalogue() == ()
    lung, _ = app.registry.add_file(_pack(tmp_path, "lung-seg"))
    knee, _ = app.registry.add_file(_pack(tmp_path, "knee-seg", modalities=["MR"], body_parts=["KNEE"],
                                          anatomy=[{"value": "72696002", "meaning": "Knee"}], findings=[]))
    first = app.registry.catalogue()
    assert [(e.uid, e.series_uid, e.card.identity.name) for e in first] == sorted(
        [(lung.uid, lung.series_uid, "lung-seg"), (knee.uid, knee.series_uid, "knee-seg")])
    assert app.registry.catalogue() is first and len(parsed) == 2  # unchanged: the same tuple, nothing parsed
    app.registry.remove(lung.uid)
    assert [e.uid for e in app.registry.catalogue()] == [knee.uid] and len(parsed) == 2
    app.registry.add_file(_pack(tmp_path, "lung-seg"))
    assert len(app.registry.catalogue()) == 2 and len(parsed) == 3

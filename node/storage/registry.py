"""The model registry: verified model objects, indexed by every searchable field of their cards.

A model enters the registry only after :func:`iods.model_object.unpack_file` has verified it
(checksum, onnx.checker, signature against the card). Its file goes into the content-addressed
object store and its instance into the instance index, so C-FIND, C-MOVE and C-GET see it like any
other instance.

Duplicates: a model version is immutable. Storing the same SOP Instance UID again with the same
bytes is a no-op that succeeds; with different bytes it is refused (:class:`ModelConflict`):
publish a new version (a new UID whose card names the old one as ``provenance.parent_uid``).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import importlib.resources
import json
import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import peewee

from iods import model_object
from iods.card import CardError, ModelCard, card_from_json
from node.storage import index
from node.storage.db import BaseModel, database_proxy, statements, write_transaction
from node.storage.objects import ObjectStore, StoredObject

# Named as before node/ was split into stages, so that log filters and greps keep working.
log = logging.getLogger("node.registry")


class ModelConflict(ValueError):
    """The SOP Instance UID is registered with different content."""

    code = "model-conflict"


class ModelRecord(BaseModel):
    uid = peewee.CharField(max_length=64, unique=True)  # = SOP Instance UID = card identity.uid
    name = peewee.CharField(max_length=64, index=True)
    version = peewee.CharField(max_length=64)
    manufacturer = peewee.CharField(max_length=64, default="")
    licence = peewee.CharField(max_length=64, default="")
    intended_use = peewee.TextField(default="")
    created = peewee.CharField(max_length=10, default="")
    task = peewee.CharField(max_length=16, index=True)
    layout = peewee.CharField(max_length=4)
    channels = peewee.IntegerField(default=1)
    min_slices = peewee.IntegerField(default=1)
    parent_uid = peewee.CharField(max_length=64, default="", index=True)
    study_uid = peewee.CharField(max_length=64)
    series_uid = peewee.CharField(max_length=64)
    payload_sha256 = peewee.CharField(max_length=64)
    payload_length = peewee.BigIntegerField()
    file_digest = peewee.CharField(max_length=64)
    file_size = peewee.BigIntegerField()
    card_json = peewee.TextField()
    source = peewee.CharField(max_length=64, default="")
    added_at = peewee.DateTimeField(default=_dt.datetime.now)

    @property
    def card(self) -> ModelCard:
        return card_from_json(self.card_json)

    def terms(self, kind: str) -> list[ModelTerm]:
        return [t for t in self.term_rows if t.kind == kind]


class ModelTerm(BaseModel):
    """One searchable value of a model: a modality, body part, anatomy or finding code."""

    model = peewee.ForeignKeyField(ModelRecord, backref="term_rows", on_delete="CASCADE")
    kind = peewee.CharField(max_length=16)  # modality | body_part | anatomy | finding | laterality
    scheme = peewee.CharField(max_length=16, default="")
    value = peewee.CharField(max_length=64)
    meaning = peewee.CharField(max_length=128, default="")

    class Meta:
        indexes = ((("kind", "scheme", "value"), False),)


class RegistryMark(BaseModel):
    """A fact about the registry's past that its current rows no longer show.

    ``model-removed``: a model was removed once. With it, an empty registry is one a site
    emptied, not a new one, and the shipped reference models are not registered again
    (:func:`register_reference_models`).
    """

    name = peewee.CharField(max_length=64, unique=True)
    at = peewee.DateTimeField(default=_dt.datetime.now)


MODEL_REMOVED = "model-removed"


@dataclass(frozen=True)
class Filters:
    """Filters for :meth:`Registry.list`; empty fields do not filter."""

    name: str = ""
    modality: str = ""
    body_part: str = ""
    anatomy: str = ""  # SNOMED CT code value
    finding: str = ""  # SNOMED CT code value
    task: str = ""
    version: str = ""


def _terms(card: ModelCard) -> Iterable[tuple[str, str, str, str]]:
    t = card.target
    for m in t.modalities:
        yield "modality", "", m, ""
    for bp in t.body_parts:
        yield "body_part", "", bp, ""
    for c in t.anatomy:
        yield "anatomy", c.scheme, c.value, c.meaning
    for c in t.findings:
        yield "finding", c.scheme, c.value, c.meaning
    if t.laterality:
        yield "laterality", "", t.laterality, ""


@dataclass(frozen=True)
class CatalogueEntry:
    """A registered model as the selection reads it: its UID, its series and its parsed card."""

    uid: str
    series_uid: str
    card: ModelCard


class Registry:
    def __init__(self, store: ObjectStore, *, max_payload: int = model_object.DEFAULT_MAX_PAYLOAD) -> None:
        self.store = store
        self.max_payload = max_payload
        # catalogue(): the registry's (uid, series_uid, file_digest) rows when last read, and
        # what they gave; parsed cards by (uid, file_digest).
        self._catalogue_lock = threading.Lock()
        self._catalogue_rows: list[tuple[str, str, str]] = []
        self._catalogue: tuple[CatalogueEntry, ...] = ()
        self._cards: dict[tuple[str, str], ModelCard] = {}

    # ------------------------------------------------------------------ writes

    def add_file(
        self, path: str | Path, *, source: str = "cli", progress: Callable[[int], None] | None = None
    ) -> tuple[ModelRecord, bool]:
        """Verify and register a model object file. Returns (record, True if newly added)."""
        card = model_object.unpack_file(path, None, max_payload=self.max_payload, progress=progress)
        stored = self.store.put_file(path)
        ds = model_object.read_file(stored.path)
        return self.register_stored(ds, stored, card=card, source=source)

    def register_stored(
        self,
        ds,  # pydicom Dataset read from ``stored.path`` (payload may stay deferred)
        stored: StoredObject,
        *,
        card: ModelCard | None = None,
        payload: model_object.PayloadInfo | None = None,
        source: str = "",
        transfer_syntax: str | None = None,
    ) -> tuple[ModelRecord, bool]:
        """Index a model object already verified and in the store. Idempotent for equal content.

        ``card`` and ``payload`` are what the verification read (:func:`iods.model_object.verify`);
        without them they are read from ``ds`` again. The rows are written with hand-written SQL
        (node.storage.db.Statements): peewee composing the look-up and the inserts cost about
        1.5 ms of a model object's 14 ms on the Storage SCP (issue 19).
        """
        if card is None or payload is None:
            read, payload = model_object.read_card(ds, max_payload=self.max_payload)
            card = card or read
        uid = str(ds.SOPInstanceUID)
        card_json = card.to_json()
        db = database_proxy.obj
        st = statements()
        # Inside the Storage SCP's transaction already: no savepoint of its own (a refusal rolls
        # the whole transaction back).
        with contextlib.nullcontext() if db.in_transaction() else write_transaction(db):
            found = st.first('SELECT "id" FROM "modelrecord" WHERE "uid" = ?', [uid])
            if found is not None:
                existing = ModelRecord.get_by_id(found[0])
                if existing.payload_sha256 == payload.sha256 and existing.card_json == card_json:
                    return existing, False
                raise ModelConflict(
                    f"model {uid} ({existing.name} {existing.version}) is already registered with a different "
                    "payload or card; a model version is immutable, publish a new version with its own UID"
                )
            ts = transfer_syntax or str(getattr(ds, "file_meta", {}).get("TransferSyntaxUID", model_object.ExplicitVRLittleEndian))
            index.index_instance(ds, digest=stored.digest, size=stored.size, transfer_syntax=ts, calling_ae=source, is_model=True)
            ident = card.identity
            values = {
                "uid": uid,
                "name": ident.name,
                "version": ident.version,
                "manufacturer": ident.manufacturer,
                "licence": ident.licence,
                "intended_use": ident.intended_use,
                "created": ident.created,
                "task": card.task.type,
                "layout": card.input.layout,
                "channels": card.input.channels,
                "min_slices": card.input.min_slices,
                "parent_uid": card.provenance.parent_uid,
                "study_uid": str(ds.StudyInstanceUID),
                "series_uid": str(ds.SeriesInstanceUID),
                "payload_sha256": payload.sha256,
                "payload_length": payload.length,
                "file_digest": stored.digest,
                "file_size": stored.size,
                "card_json": card_json,
                "source": source[:64],
                "added_at": _dt.datetime.now(),
            }
            record_id = st.insert(ModelRecord, values)
            terms = [(record_id, k, sch, v, m[:128]) for k, sch, v, m in _terms(card)]
            if terms:
                p = st.p
                db.cursor().executemany(
                    f'INSERT INTO "{ModelTerm._meta.table_name}" ("model_id", "kind", "scheme", "value", "meaning") '
                    f"VALUES ({p}, {p}, {p}, {p}, {p})", terms)
        record = ModelRecord(id=record_id, **values)
        log.info("model registered: %s %s (%s) from %s", ident.name, ident.version, uid, source or "local")
        return record, True

    def remove(self, uid: str) -> ModelRecord | None:
        """Remove a model and its file (when no other instance shares the bytes)."""
        db = database_proxy.obj
        with write_transaction(db):
            record = ModelRecord.get_or_none(ModelRecord.uid == uid)
            if record is None:
                return None
            record.delete_instance(recursive=True)
            index.remove_instance(uid)
            RegistryMark.insert(name=MODEL_REMOVED).on_conflict_ignore().execute()
            in_use = index.digest_in_use(record.file_digest)
        if not in_use:
            self.store.remove(record.file_digest)
        log.info("model removed: %s %s (%s)", record.name, record.version, uid)
        return record

    # ------------------------------------------------------------------ reads

    def get(self, uid: str) -> ModelRecord | None:
        return ModelRecord.get_or_none(ModelRecord.uid == uid)

    def path(self, record: ModelRecord) -> Path:
        return self.store.path(record.file_digest)

    def list(self, filters: Filters | None = None) -> list[ModelRecord]:
        f = filters or Filters()
        q = ModelRecord.select()
        if f.name:
            # Plain text matches anywhere in the name; '*' and '?' make it a glob like findscu's.
            if "*" in f.name or "?" in f.name:
                pattern = f.name.replace("%", r"\%").replace("_", r"\_").replace("*", "%").replace("?", "_")
                q = q.where(ModelRecord.name ** pattern)
            else:
                q = q.where(ModelRecord.name.contains(f.name))
        if f.task:
            q = q.where(ModelRecord.task == f.task)
        if f.version:
            q = q.where(ModelRecord.version == f.version)
        for kind, value in (("modality", f.modality), ("body_part", f.body_part), ("anatomy", f.anatomy), ("finding", f.finding)):
            if value:
                wanted = value.upper() if kind in ("modality", "body_part") else value
                sub = ModelTerm.select(ModelTerm.model).where((ModelTerm.kind == kind) & (ModelTerm.value == wanted))
                q = q.where(ModelRecord.id.in_(sub))
        return list(q.order_by(ModelRecord.name, ModelRecord.created, ModelRecord.version))

    def catalogue(self) -> tuple[CatalogueEntry, ...]:
        """Every registered model with its card, in UID order, each card parsed once.

        A model version is immutable and its file is named by its SHA-256, so a card parsed for
        a (UID, file digest) stays right for as long as that row is there. Each call reads the
        registry's (UID, series, digest) rows, one short query (3.5-6.5 ms for 2,000 models on a
        busy 2-core machine), so models added or removed by anyone (another node on the same
        PostgreSQL registry, the CLI) are seen at once; only new rows' cards are read and parsed
        (parsing 2,000 cards took 0.46-0.6 s). The same tuple comes back while nothing changed,
        so callers may key their own caches on it.
        """
        sql, params = (ModelRecord.select(ModelRecord.uid, ModelRecord.series_uid, ModelRecord.file_digest)
                       .order_by(ModelRecord.uid).sql())
        rows = [tuple(r) for r in database_proxy.obj.execute_sql(sql, params).fetchall()]
        with self._catalogue_lock:
            if rows == self._catalogue_rows:
                return self._catalogue
            wanted = {(uid, digest) for uid, _, digest in rows}
            cards = {k: v for k, v in self._cards.items() if k in wanted}
            missing = sorted(uid for uid, digest in wanted if (uid, digest) not in cards)
            for i in range(0, len(missing), 500):
                chunk = (ModelRecord.select(ModelRecord.uid, ModelRecord.file_digest, ModelRecord.card_json)
                         .where(ModelRecord.uid.in_(missing[i:i + 500])).tuples())
                for uid, digest, card_json in chunk:
                    cards[(uid, digest)] = card_from_json(card_json)
            entries = []
            for uid, series_uid, digest in rows:
                card = cards.get((uid, digest))
                if card is not None:  # (a row replaced between the two reads: seen next time)
                    entries.append(CatalogueEntry(uid, series_uid, card))
            self._cards = cards
            self._catalogue_rows = rows if len(entries) == len(rows) else []
            self._catalogue = tuple(entries)
            return self._catalogue

    def all_with_terms(self) -> list[ModelRecord]:
        """Every model with its terms prefetched (for the selection algorithm)."""
        return list(peewee.prefetch(ModelRecord.select().order_by(ModelRecord.uid), ModelTerm.select()))

    def never_held_a_model(self) -> bool:
        """True when no model is registered and none was ever removed: a new registry."""
        return not ModelRecord.select().exists() and not RegistryMark.select().where(
            RegistryMark.name == MODEL_REMOVED).exists()


REFERENCE_SOURCE = "reference"


def reference_model_files() -> list[Path]:
    """The model objects shipped in the ``models`` package (``models/reference/*.dcm``)."""
    folder = importlib.resources.files("models") / "reference"
    return sorted(Path(str(entry)) for entry in folder.iterdir() if entry.name.endswith(".dcm"))


def register_reference_models(registry: Registry, files: Iterable[Path] | None = None) -> list[ModelRecord]:
    """Register the shipped reference models in a registry that never held a model.

    What ``modelnode serve`` does at start (``[models] register_reference``), so that a new node
    segments its first chest CT with no other command. Each file goes through
    :meth:`Registry.add_file`, the path of ``modelnode models add``, with its verification. A
    registry that holds a model, or that held one and had it removed, is left as it is: a site
    that removed the reference models does not get them back at the next start. A file that
    fails verification is logged as an ERROR and skipped: the node serves without it.
    """
    if not registry.never_held_a_model():
        return []
    files = list(reference_model_files() if files is None else files)
    if not files:
        log.warning("the model registry is new, but this installation ships no reference models")
        return []
    log.info("the model registry is new: registering the %d shipped reference model(s) "
             "([models] register_reference = false turns this off)", len(files))
    added = []
    for path in files:
        try:
            record, _ = registry.add_file(path, source=REFERENCE_SOURCE)
        except peewee.IntegrityError:
            # Another node sharing this (PostgreSQL) registry registered it at the same moment.
            log.info("reference model %s: registered by another node meanwhile", path.name)
            continue
        except (model_object.ModelObjectError, CardError, ModelConflict, OSError) as exc:
            log.error("reference model %s not registered: %s", path, exc)
            continue
        added.append(record)
    return added


def record_summary(record: ModelRecord) -> dict:
    """A JSON-friendly view of a registered model (for ``models show`` and ``models list --json``)."""
    card = record.card
    return {
        "uid": record.uid,
        "name": record.name,
        "version": record.version,
        "task": record.task,
        "modalities": list(card.target.modalities),
        "body_parts": list(card.target.body_parts),
        "anatomy": [f"{c.scheme}:{c.value} {c.meaning}" for c in card.target.anatomy],
        "findings": [f"{c.scheme}:{c.value} {c.meaning}" for c in card.target.findings],
        "classes": [c.label for c in card.task.classes],
        "parent_uid": record.parent_uid,
        "payload_sha256": record.payload_sha256,
        "payload_length": record.payload_length,
        "file_digest": record.file_digest,
        "added_at": record.added_at.isoformat(timespec="seconds") if isinstance(record.added_at, _dt.datetime) else str(record.added_at),
        "source": record.source,
        "card": json.loads(record.card_json),
    }


def model_record(uid: str) -> ModelRecord | None:
    """The registered model with this SOP Instance UID, if any.

    Hand-written SQL (node.storage.db.Statements): the audit of every stored model asks.
    """
    fields = list(ModelRecord._meta.sorted_fields)
    columns = ", ".join(f'"{f.column_name}"' for f in fields)
    row = statements().first(f'SELECT {columns} FROM "{ModelRecord._meta.table_name}" WHERE "uid" = ?', [uid])
    if row is None:
        return None
    return ModelRecord(**{f.name: f.python_value(v) for f, v in zip(fields, row, strict=True)})

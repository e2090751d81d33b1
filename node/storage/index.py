"""The instance index: patient / study / series / instance rows for everything the node stores.

C-FIND answers from these tables and C-MOVE/C-GET find files through them. Each row keeps the
attributes the query keys and the model selection need; the file itself is found by its digest
in the object store, never by a UID.
"""

from __future__ import annotations

import datetime as _dt
import json
import struct
from dataclasses import dataclass
from typing import Any

import peewee
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset

from node.storage.db import BaseModel, Statements, statements

# Text VRs whose ASCII bytes are split exactly as pydicom 3 splits them (pydicom.values):
# padding stripped from the whole value, from each value, or spaces on both sides of each value.
# (DA/DT/TM as strings: config.datetime_conversion is off.) DS and IS: see _number_list.
_WHOLE_STRIP_VRS = frozenset({"AS", "CS", "UI", "DA", "DT", "TM", "PN"})
_EACH_STRIP_VRS = frozenset({"LO", "SH", "UC"})
_PLAIN_TEXT_VRS = _WHOLE_STRIP_VRS | _EACH_STRIP_VRS | {"AE"}
_BINARY_INTS = {"US": "H", "SS": "h", "UL": "I", "SL": "i"}
_tags: dict[str, int] = {}


def _tag(keyword: str) -> int | None:
    tag = _tags.get(keyword)
    if tag is None:
        tag = _tags[keyword] = tag_for_keyword(keyword)
    return tag


def _absent(ds: Dataset, keyword: str) -> bool:
    """Certainly not in ``ds`` (pydicom's ds.get would look it up at length to say so)."""
    tag = _tag(keyword)
    return tag is not None and tag not in ds._dict


def _raw(ds: Dataset, keyword: str) -> tuple[str, bytes, bool] | None:
    """(VR, bytes, little endian) of an element pydicom has not converted yet, else None.

    Indexing reads about 40 attributes of every instance; pydicom's conversion (validation,
    DSfloat, MultiValue) cost about 1 ms of that per instance. Raw values are read directly
    when the result is certain to be what pydicom would give; anything else (a converted
    element, non-ASCII text that needs the character set, odd VRs) takes pydicom's path.
    """
    tag = _tag(keyword)
    # The element store itself: ds.get_item(tag, keep_deferred=True) is the same look-up behind
    # a tag conversion that cost more than the rest of this function (50 look-ups per instance).
    elem = ds._dict.get(tag) if tag is not None else None
    if not isinstance(elem, RawDataElement) or elem.value is None:
        return None
    vr = elem.VR or dictionary_VR(tag)
    return vr, elem.value, elem.is_little_endian


def _split_text(vr: str, data: bytes) -> list[str]:
    text = data.decode("ascii")
    if vr in _WHOLE_STRIP_VRS:
        return text.rstrip(" \0").split("\\")
    if vr in _EACH_STRIP_VRS:
        return [v.rstrip("\0 ") for v in text.split("\\")]
    return [v.strip() for v in text.split("\\")]  # AE


def _text(ds: Dataset, keyword: str, limit: int = 0) -> str:
    raw = _raw(ds, keyword)
    if raw is not None and raw[0] in _PLAIN_TEXT_VRS and raw[1].isascii():
        text = "\\".join(_split_text(raw[0], raw[1])).strip()
        return text[:limit] if limit else text
    if _absent(ds, keyword):
        return ""
    value = ds.get(keyword, "")
    if value is None:
        return ""
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        value = "\\".join(str(v) for v in value)
    text = str(value).strip()
    return text[:limit] if limit else text


def text(ds: Dataset, keyword: str) -> str:
    """The value of ``keyword`` as one string (values joined by a backslash), as the index sees it.

    Read from the raw bytes when pydicom would give the same, so it is cheap; "" when absent.
    """
    return _text(ds, keyword)


def _number_list(ds: Dataset, keyword: str) -> list[int | float] | None:
    """DS, IS and binary integers straight from the raw bytes; None to take pydicom's path."""
    raw = _raw(ds, keyword)
    if raw is None:
        return None
    vr, data, little = raw
    try:
        if vr in ("DS", "IS") and data.isascii():
            parts = data.decode("ascii").split("\\")
            convert = float if vr == "DS" else int
            return [convert(p.strip(" \0")) for p in parts]
        if vr in _BINARY_INTS:
            fmt = _BINARY_INTS[vr]
            count = len(data) // struct.calcsize(fmt)
            return list(struct.unpack(("<" if little else ">") + fmt * count, data[: count * struct.calcsize(fmt)]))
    except (ValueError, struct.error):
        return None  # empty or malformed values: pydicom decides what they mean
    return None


class Patient(BaseModel):
    patient_id = peewee.CharField(max_length=64, index=True)
    issuer = peewee.CharField(max_length=64, default="")
    patient_name = peewee.CharField(max_length=324, default="", index=True)
    birth_date = peewee.CharField(max_length=8, default="")
    sex = peewee.CharField(max_length=16, default="")

    class Meta:
        indexes = ((("patient_id", "issuer"), True),)


class Study(BaseModel):
    study_uid = peewee.CharField(max_length=64, unique=True)
    patient = peewee.ForeignKeyField(Patient, backref="studies", on_delete="CASCADE")
    study_date = peewee.CharField(max_length=8, default="", index=True)
    study_time = peewee.CharField(max_length=16, default="")
    accession_number = peewee.CharField(max_length=16, default="", index=True)
    study_id = peewee.CharField(max_length=16, default="")
    study_description = peewee.CharField(max_length=64, default="")
    referring_physician = peewee.CharField(max_length=324, default="")
    requested_procedure = peewee.CharField(max_length=64, default="")


class Series(BaseModel):
    series_uid = peewee.CharField(max_length=64, unique=True)
    study = peewee.ForeignKeyField(Study, backref="series", on_delete="CASCADE")
    modality = peewee.CharField(max_length=16, default="", index=True)
    series_number = peewee.CharField(max_length=12, default="")
    series_description = peewee.CharField(max_length=64, default="")
    series_date = peewee.CharField(max_length=8, default="")
    series_time = peewee.CharField(max_length=16, default="")
    body_part = peewee.CharField(max_length=16, default="", index=True)
    protocol_name = peewee.CharField(max_length=64, default="")
    laterality = peewee.CharField(max_length=16, default="")
    manufacturer = peewee.CharField(max_length=64, default="")
    software_versions = peewee.CharField(max_length=64, default="")
    is_model = peewee.BooleanField(default=False, index=True)
    # Time of the last instance received; the pipeline's quiet timer starts from it.
    last_received = peewee.DateTimeField(default=_dt.datetime.now)


class Instance(BaseModel):
    sop_uid = peewee.CharField(max_length=64, unique=True)
    series = peewee.ForeignKeyField(Series, backref="instances", on_delete="CASCADE")
    sop_class_uid = peewee.CharField(max_length=64, index=True)
    instance_number = peewee.IntegerField(null=True)
    transfer_syntax = peewee.CharField(max_length=64)
    digest = peewee.CharField(max_length=64, index=True)
    size = peewee.BigIntegerField()
    rows = peewee.IntegerField(null=True)
    columns = peewee.IntegerField(null=True)
    frames = peewee.IntegerField(null=True)
    samples_per_pixel = peewee.IntegerField(null=True)
    photometric = peewee.CharField(max_length=16, default="")
    has_pixels = peewee.BooleanField(default=False)
    # Attributes the selection and the pipeline read (geometry, rescale, window), as JSON.
    attrs = peewee.TextField(default="{}")
    received_at = peewee.DateTimeField(default=_dt.datetime.now, index=True)
    calling_ae = peewee.CharField(max_length=16, default="")

    def attributes(self) -> dict[str, Any]:
        return json.loads(self.attrs or "{}")


_EXTRA_ATTRS = (
    "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "SliceThickness",
    "RescaleSlope", "RescaleIntercept", "WindowCenter", "WindowWidth", "FrameOfReferenceUID",
    "ViewPosition", "ImageType", "AcquisitionNumber", "BitsStored", "PixelRepresentation",
)


def _json_value(value: Any) -> Any:
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return [_json_value(v) for v in value]
    if isinstance(value, (int, float)):
        return value
    try:
        return float(value)
    except (TypeError, ValueError):
        return str(value)


def _int(ds: Dataset, keyword: str) -> int | None:
    fast = _number_list(ds, keyword)
    if fast:
        return int(fast[0])
    if _absent(ds, keyword):
        return None
    try:
        value = ds.get(keyword)
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def _extra_attrs(ds: Dataset) -> dict[str, Any]:
    """The attributes of ``_EXTRA_ATTRS`` present in ``ds``, as JSON values."""
    attrs: dict[str, Any] = {}
    for k in _EXTRA_ATTRS:
        fast = _number_list(ds, k)
        if fast:
            attrs[k] = fast[0] if len(fast) == 1 else fast
            continue
        if _absent(ds, k):
            continue
        raw = _raw(ds, k)
        if raw is not None and raw[0] in _PLAIN_TEXT_VRS and raw[1].isascii():
            parts = [_json_value(v) for v in _split_text(raw[0], raw[1])]
            if raw[1].strip(b" \0"):
                attrs[k] = parts[0] if len(parts) == 1 else parts
            continue
        value = ds.get(k)
        if value not in (None, ""):
            attrs[k] = _json_value(value)
    return attrs


def _get_or_insert(st: Statements, model: type[BaseModel], lookup_sql: str, key: list[Any],
                   values: dict[str, Any]) -> int:
    row = st.first(lookup_sql, key)
    if row is not None:
        return row[0]
    try:
        with st.db.atomic():  # a savepoint: a concurrent writer may have inserted it meanwhile
            return st.insert(model, values)
    except peewee.IntegrityError:
        row = st.first(lookup_sql, key)
        if row is None:
            raise
        return row[0]


@dataclass(frozen=True)
class IndexEntry:
    """The column values :func:`index_instance` writes for one dataset.

    Reading them costs pydicom access, so the C-STORE path has a worker read them
    (:func:`entry_for`) while the data still arrives, and the write transaction holds only the
    SQL. The patient, study and series columns are written only by the first instance of a
    series: they are read from ``ds`` when asked for, not for every instance.
    """

    ds: Dataset
    sop_uid: str
    series_uid: str
    study_uid: str
    instance: dict[str, Any]

    def patient(self) -> dict[str, Any]:
        return _columns(self.ds, _PATIENT_COLUMNS)

    def study(self) -> dict[str, Any]:
        return _columns(self.ds, _STUDY_COLUMNS)

    def series(self) -> dict[str, Any]:
        return _columns(self.ds, _SERIES_COLUMNS)


# (column, attribute keyword, length limit) of the text columns of each level.
_PATIENT_COLUMNS = (
    ("patient_id", "PatientID", 64), ("issuer", "IssuerOfPatientID", 64), ("patient_name", "PatientName", 324),
    ("birth_date", "PatientBirthDate", 8), ("sex", "PatientSex", 16),
)
_STUDY_COLUMNS = (
    ("study_date", "StudyDate", 8), ("study_time", "StudyTime", 16), ("accession_number", "AccessionNumber", 16),
    ("study_id", "StudyID", 16), ("study_description", "StudyDescription", 64),
    ("referring_physician", "ReferringPhysicianName", 324),
    ("requested_procedure", "RequestedProcedureDescription", 64),
)
_SERIES_COLUMNS = (
    ("modality", "Modality", 16), ("series_number", "SeriesNumber", 12),
    ("series_description", "SeriesDescription", 64), ("series_date", "SeriesDate", 8),
    ("series_time", "SeriesTime", 16), ("body_part", "BodyPartExamined", 16), ("protocol_name", "ProtocolName", 64),
    ("laterality", "Laterality", 16), ("manufacturer", "Manufacturer", 64),
    ("software_versions", "SoftwareVersions", 64),
)


def _columns(ds: Dataset, spec: tuple[tuple[str, str, int], ...]) -> dict[str, Any]:
    return {column: _text(ds, keyword, limit) for column, keyword, limit in spec}


def entry_for(ds: Dataset) -> IndexEntry:
    """What the index keeps of ``ds``: the instance columns now, the other levels on demand."""
    attrs = _extra_attrs(ds)
    return IndexEntry(
        ds=ds,
        sop_uid=_text(ds, "SOPInstanceUID", 64),
        series_uid=_text(ds, "SeriesInstanceUID", 64),
        study_uid=_text(ds, "StudyInstanceUID", 64),
        instance={
            "sop_class_uid": _text(ds, "SOPClassUID", 64),
            "instance_number": _int(ds, "InstanceNumber"),
            "rows": _int(ds, "Rows"),
            "columns": _int(ds, "Columns"),
            "frames": _int(ds, "NumberOfFrames"),
            "samples_per_pixel": _int(ds, "SamplesPerPixel"),
            "photometric": _text(ds, "PhotometricInterpretation", 16),
            "has_pixels": "PixelData" in ds or "FloatPixelData" in ds or "DoubleFloatPixelData" in ds,
            "attrs": json.dumps(attrs, sort_keys=True),
        },
    )


def index_instance(
    ds: Dataset,
    *,
    digest: str,
    size: int,
    transfer_syntax: str,
    calling_ae: str = "",
    is_model: bool = False,
    entry: IndexEntry | None = None,
) -> tuple[Instance, Instance | None]:
    """Insert or update the rows for ``ds``; returns (row, previous row for the same SOP UID).

    Call inside a transaction. ``entry``, when given, is ``entry_for(ds)`` computed earlier.
    The caller decides what a duplicate SOP Instance UID means; this function just points the
    instance row at the new file.
    """
    if entry is None:
        entry = entry_for(ds)
    st = statements()
    now = _dt.datetime.now()
    series_uid = entry.series_uid
    found = st.first('SELECT "id" FROM "series" WHERE "series_uid" = ?', [series_uid])
    if found is not None:
        series_id = found[0]
        st.update(Series, series_id, {"last_received": now})
    else:
        patient = entry.patient()
        patient_id = _get_or_insert(
            st, Patient, 'SELECT "id" FROM "patient" WHERE "patient_id" = ? AND "issuer" = ?',
            [patient["patient_id"], patient["issuer"]], patient,
        )
        study_id = _get_or_insert(
            st, Study, 'SELECT "id" FROM "study" WHERE "study_uid" = ?', [entry.study_uid],
            {"study_uid": entry.study_uid, "patient": patient_id, **entry.study()},
        )
        series_id = _get_or_insert(
            st, Series, 'SELECT "id" FROM "series" WHERE "series_uid" = ?', [series_uid],
            {"series_uid": series_uid, "study": study_id, **entry.series(), "is_model": is_model,
             "last_received": now},
        )
    fields: dict[str, Any] = {
        "series": series_id,
        **entry.instance,
        "transfer_syntax": transfer_syntax,
        "digest": digest,
        "size": size,
        "received_at": now,
        "calling_ae": calling_ae[:16],
    }
    sop_uid = entry.sop_uid
    existing = st.first('SELECT "id" FROM "instance" WHERE "sop_uid" = ?', [sop_uid])
    previous = None
    if existing is None:
        row_id = st.insert(Instance, {"sop_uid": sop_uid, **fields})
    else:
        row_id = existing[0]
        previous = Instance.get_by_id(row_id)  # rare (a duplicate): the full old row for the caller
        st.update(Instance, row_id, fields)
    fields["series_id"] = fields.pop("series")
    row = Instance(id=row_id, sop_uid=sop_uid, **fields)
    return row, previous


def stored_digest(sop_uid: str, with_model_flag: bool = False) -> Any:
    """The digest of the file indexed for ``sop_uid`` (None if unknown), cheaply.

    With ``with_model_flag``: (digest, whether its series holds a model) or None.
    """
    st = statements()
    if not with_model_flag:
        row = st.first('SELECT "digest" FROM "instance" WHERE "sop_uid" = ?', [sop_uid])
        return row[0] if row else None
    row = st.first('SELECT i."digest", s."is_model" FROM "instance" AS i JOIN "series" AS s ON s."id" = i."series_id" '
                   'WHERE i."sop_uid" = ?', [sop_uid])
    return (row[0], bool(row[1])) if row else None


def remove_instance(sop_uid: str) -> Instance | None:
    """Delete an instance row and any series/study/patient rows it leaves empty."""
    row = Instance.get_or_none(Instance.sop_uid == sop_uid)
    if row is None:
        return None
    series_id = row.series_id
    row.delete_instance()
    prune_series(series_id)
    return row


def prune_series(series_id: int) -> None:
    """Delete the series if it has no instance left, then its study and patient if empty."""
    series = Series.get_or_none(Series.id == series_id)
    if series is None or series.instances.exists():
        return
    study = series.study
    series.delete_instance()
    if not study.series.exists():
        patient = study.patient
        study.delete_instance()
        if not patient.studies.exists():
            patient.delete_instance()


def digest_in_use(digest: str) -> bool:
    return Instance.select().where(Instance.digest == digest).exists()


def study_uids_of(sop_uids: list[str], limit: int = 50) -> list[str]:
    """The studies the given instances belong to (at most ``limit``, sorted)."""
    found: set[str] = set()
    for i in range(0, len(sop_uids), 500):
        chunk = sop_uids[i:i + 500]
        rows = (Study.select(Study.study_uid).distinct()
                .join(Series).join(Instance).where(Instance.sop_uid.in_(chunk)))
        found.update(r.study_uid for r in rows)
        if len(found) >= limit:
            break
    return sorted(found)[:limit]

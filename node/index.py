"""The instance index: patient / study / series / instance rows for everything the node stores.

C-FIND answers from these tables and C-MOVE/C-GET find files through them. Each row keeps the
attributes the query keys and the model selection need; the file itself is found by its digest
in the object store, never by a UID.
"""

from __future__ import annotations

import datetime as _dt
import json
from typing import Any

import peewee
from pydicom.dataset import Dataset

from node.db import BaseModel


def _text(ds: Dataset, keyword: str, limit: int = 0) -> str:
    value = ds.get(keyword, "")
    if value is None:
        return ""
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        value = "\\".join(str(v) for v in value)
    text = str(value).strip()
    return text[:limit] if limit else text


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
    try:
        value = ds.get(keyword)
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def index_instance(
    ds: Dataset,
    *,
    digest: str,
    size: int,
    transfer_syntax: str,
    calling_ae: str = "",
    is_model: bool = False,
) -> tuple[Instance, Instance | None]:
    """Insert or update the rows for ``ds``; returns (row, previous row for the same SOP UID).

    Call inside a transaction. The caller decides what a duplicate SOP Instance UID means;
    this function just points the instance row at the new file.
    """
    now = _dt.datetime.now()
    patient, _ = Patient.get_or_create(
        patient_id=_text(ds, "PatientID", 64),
        issuer=_text(ds, "IssuerOfPatientID", 64),
        defaults={"patient_name": _text(ds, "PatientName", 324), "birth_date": _text(ds, "PatientBirthDate", 8),
                  "sex": _text(ds, "PatientSex", 16)},
    )
    study, created = Study.get_or_create(
        study_uid=_text(ds, "StudyInstanceUID", 64),
        defaults={
            "patient": patient,
            "study_date": _text(ds, "StudyDate", 8),
            "study_time": _text(ds, "StudyTime", 16),
            "accession_number": _text(ds, "AccessionNumber", 16),
            "study_id": _text(ds, "StudyID", 16),
            "study_description": _text(ds, "StudyDescription", 64),
            "referring_physician": _text(ds, "ReferringPhysicianName", 324),
            "requested_procedure": _text(ds, "RequestedProcedureDescription", 64),
        },
    )
    series, created = Series.get_or_create(
        series_uid=_text(ds, "SeriesInstanceUID", 64),
        defaults={
            "study": study,
            "modality": _text(ds, "Modality", 16),
            "series_number": _text(ds, "SeriesNumber", 12),
            "series_description": _text(ds, "SeriesDescription", 64),
            "series_date": _text(ds, "SeriesDate", 8),
            "series_time": _text(ds, "SeriesTime", 16),
            "body_part": _text(ds, "BodyPartExamined", 16),
            "protocol_name": _text(ds, "ProtocolName", 64),
            "laterality": _text(ds, "Laterality", 16),
            "manufacturer": _text(ds, "Manufacturer", 64),
            "software_versions": _text(ds, "SoftwareVersions", 64),
            "is_model": is_model,
            "last_received": now,
        },
    )
    if not created:
        Series.update(last_received=now).where(Series.id == series.id).execute()
    attrs = {k: _json_value(ds.get(k)) for k in _EXTRA_ATTRS if ds.get(k) not in (None, "")}
    fields = {
        "series": series,
        "sop_class_uid": _text(ds, "SOPClassUID", 64),
        "instance_number": _int(ds, "InstanceNumber"),
        "transfer_syntax": transfer_syntax,
        "digest": digest,
        "size": size,
        "rows": _int(ds, "Rows"),
        "columns": _int(ds, "Columns"),
        "frames": _int(ds, "NumberOfFrames"),
        "samples_per_pixel": _int(ds, "SamplesPerPixel"),
        "photometric": _text(ds, "PhotometricInterpretation", 16),
        "has_pixels": "PixelData" in ds or "FloatPixelData" in ds or "DoubleFloatPixelData" in ds,
        "attrs": json.dumps(attrs, sort_keys=True),
        "received_at": now,
        "calling_ae": calling_ae[:16],
    }
    sop_uid = _text(ds, "SOPInstanceUID", 64)
    previous = Instance.get_or_none(Instance.sop_uid == sop_uid)
    if previous is None:
        row = Instance.create(sop_uid=sop_uid, **fields)
    else:
        Instance.update(**fields).where(Instance.id == previous.id).execute()
        row = Instance.get_by_id(previous.id)
    return row, previous


def remove_instance(sop_uid: str) -> Instance | None:
    """Delete an instance row and any series/study/patient rows it leaves empty."""
    row = Instance.get_or_none(Instance.sop_uid == sop_uid)
    if row is None:
        return None
    series = row.series
    row.delete_instance()
    if not series.instances.exists():
        study = series.study
        series.delete_instance()
        if not study.series.exists():
            patient = study.patient
            study.delete_instance()
            if not patient.studies.exists():
                patient.delete_instance()
    return row


def digest_in_use(digest: str) -> bool:
    return Instance.select().where(Instance.digest == digest).exists()

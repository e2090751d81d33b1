"""The model object: an ONNX model and its card carried as a Raw Data Storage instance.

Layout of one model object (see docs/model-object.md for the full table):

* Patient ``MODELNODE^MODEL LIBRARY`` (PatientID ``MODELNODE-MODEL-LIBRARY``) holds every model.
* One study per model *name* (StudyDescription = name), so all versions of a model sit together.
* One series per model *version*: Modality, BodyPartExamined, SeriesDescription, Laterality,
  Manufacturer and SoftwareVersions carry the searchable metadata a plain PACS indexes.
* The single instance's SOP Instance UID is the model's UID (``identity.uid`` in the card).
* Coded anatomy and findings go in the Acquisition Context Sequence (Target Region / Finding),
  findings also in ReasonForPerformedProcedureCodeSequence.
* The payload lives in a reserved private block of group 0x4D4D, creator ``MODELNODE MODEL 1``.

Decoding never trusts the payload: the length, the SHA-256, ``onnx.checker`` and the graph's
input/output shapes against the card must all agree before the bytes are handed out.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import io
import os
import re
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import BinaryIO

import onnx
import pydicom
from pydicom.datadict import add_private_dict_entries
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.sequence import Sequence
from pydicom.uid import UID, ExplicitVRLittleEndian

from iods.card import CardError, Code, ModelCard, card_from_json
from iods.uids import (
    IMPLEMENTATION_CLASS_UID,
    IMPLEMENTATION_VERSION_NAME,
    RAW_DATA_STORAGE,
    derived_uid,
)

PRIVATE_GROUP = 0x4D4D
PRIVATE_CREATOR = "MODELNODE MODEL 1"
LIBRARY_PATIENT_NAME = "MODELNODE^MODEL LIBRARY"
LIBRARY_PATIENT_ID = "MODELNODE-MODEL-LIBRARY"
CONTENT_LABEL = "AI_MODEL"
PAYLOAD_FORMAT = "ONNX"
# Version of this encoding, written as the Raw Data module's CreatorVersionUID.
CREATOR_VERSION_UID = UID("2.25.259614887328386373271040286331846329183")
# ONNX protobufs cannot exceed 2 GiB; refuse well before the node would try to allocate that.
DEFAULT_MAX_PAYLOAD = 1 << 30

# Offsets inside the private block (element = block start + offset).
EL_FORMAT = 0x01  # CS  payload format, "ONNX"
EL_LENGTH = 0x02  # UL  true payload length in bytes (the OB value is padded to even length)
EL_SHA256 = 0x03  # LO  SHA-256 of the payload, lower-case hex
EL_SCHEMA = 0x04  # LO  model card schema identifier
EL_CARD = 0x05  # UT  model card, JSON
EL_PAYLOAD = 0x10  # OB  the ONNX bytes

_VRS = {EL_FORMAT: "CS", EL_LENGTH: "UL", EL_SHA256: "LO", EL_SCHEMA: "LO", EL_CARD: "UT", EL_PAYLOAD: "OB"}
_CHUNK = 4 << 20
_HEX64 = re.compile(r"^[0-9a-f]{64}$")

# Let pydicom give our elements their real VRs when an object comes back in Implicit VR.
add_private_dict_entries(
    PRIVATE_CREATOR,
    {
        (PRIVATE_GROUP << 16) | (0x10 << 8) | EL_FORMAT: ("CS", "1", "Model Payload Format", ""),
        (PRIVATE_GROUP << 16) | (0x10 << 8) | EL_LENGTH: ("UL", "1", "Model Payload Length", ""),
        (PRIVATE_GROUP << 16) | (0x10 << 8) | EL_SHA256: ("LO", "1", "Model Payload SHA-256", ""),
        (PRIVATE_GROUP << 16) | (0x10 << 8) | EL_SCHEMA: ("LO", "1", "Model Card Schema", ""),
        (PRIVATE_GROUP << 16) | (0x10 << 8) | EL_CARD: ("UT", "1", "Model Card JSON", ""),
        (PRIVATE_GROUP << 16) | (0x10 << 8) | EL_PAYLOAD: ("OB", "1", "Model Payload", ""),
    },
)

# DCM codes used as Acquisition Context concept names.
TARGET_REGION = Code("123014", "Target Region", "DCM")
FINDING = Code("121071", "Finding", "DCM")
# Purpose of the reference from a fine-tuned version to the model it was derived from.
PARENT_MODEL_PURPOSE = Code("121322", "Source image for image processing operation", "DCM")


# --------------------------------------------------------------------------- errors


class ModelObjectError(ValueError):
    """A model object is refused. ``code`` is a stable short name scripts and logs can match."""

    code = "invalid-model-object"


class NotAModelObject(ModelObjectError):
    code = "not-a-model-object"


class PayloadTooLarge(ModelObjectError):
    code = "payload-too-large"


class TruncatedPayload(ModelObjectError):
    code = "truncated-payload"


class ChecksumMismatch(ModelObjectError):
    code = "checksum-mismatch"


class InvalidOnnx(ModelObjectError):
    code = "invalid-onnx"


class ShapeMismatch(ModelObjectError):
    code = "shape-mismatch"


class InvalidCard(ModelObjectError):
    code = "invalid-card"

    def __init__(self, err: CardError) -> None:
        self.field = err.field
        super().__init__(str(err))


def is_model_object(ds: Dataset) -> bool:
    """True if ``ds`` carries our private block (whatever state its payload is in)."""
    if ds.get("SOPClassUID") != RAW_DATA_STORAGE:
        return False
    return _find_block_start(ds) is not None


# --------------------------------------------------------------------------- UIDs and layout


def model_uid(name: str, version: str, sha256: str) -> UID:
    """The UID a model gets when its card leaves ``identity.uid`` empty: stable for its content."""
    return derived_uid("modelnode model", name, version, sha256)


def library_study_uid(name: str) -> UID:
    return derived_uid("modelnode model library study", name)


def library_series_uid(uid: str) -> UID:
    return derived_uid("modelnode model library series", uid)


@dataclass(frozen=True)
class PayloadInfo:
    length: int
    sha256: str


# --------------------------------------------------------------------------- encode


class _EvenLengthReader(io.BufferedIOBase):
    """The first ``length`` bytes of ``source``, then one 00H if ``length`` is odd.

    PS3.5 7.1.1 wants every value of even length, OB padded with a single trailing 00H.
    pydicom's buffered-value writer takes the value length from seeking this buffer to its end
    and then copies it chunk by chunk, so the padded length is in the header and the pad byte in
    the file, and the payload is never read into memory. ``source`` stays open and is not
    closed with this reader; it must not change between hashing and writing. ``progress``, if
    given, is told the size of each chunk read.
    """

    def __init__(
        self, source: BinaryIO, length: int, progress: Callable[[int], None] | None = None
    ) -> None:
        super().__init__()
        self._source = source
        self._progress = progress
        self._length = length
        self._size = length + (length & 1)
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._pos, os.SEEK_END: self._size}[whence]
        if base + offset < 0:
            raise ValueError(f"negative seek position {base + offset}")
        self._pos = base + offset
        return self._pos

    def read(self, size: int | None = -1) -> bytes:
        if self.closed:
            raise ValueError("read from a closed payload reader")
        want = self._size - self._pos if size is None or size < 0 else size
        want = max(0, min(want, self._size - self._pos))
        data = b""
        if want and self._pos < self._length:
            self._source.seek(self._pos)
            data = self._source.read(min(want, self._length - self._pos))
            if len(data) < min(want, self._length - self._pos):
                # The header already promised the hashed length; a short file would corrupt it.
                raise OSError(
                    f"payload source ended at {self._pos + len(data)} of {self._length} bytes "
                    "(changed while being packed)"
                )
        if len(data) < want:
            data += b"\x00"  # the pad: only ever the one byte past an odd payload
        self._pos += len(data)
        if self._progress and data:
            self._progress(len(data))
        return data

    read1 = read


def _code_item(code: Code) -> Dataset:
    item = Dataset()
    item.CodeValue = code.value
    item.CodingSchemeDesignator = code.scheme
    item.CodeMeaning = code.meaning[:64]
    return item


def _context_item(name: Code, value: Code) -> Dataset:
    item = Dataset()
    item.ValueType = "CODE"
    item.ConceptNameCodeSequence = Sequence([_code_item(name)])
    item.ConceptCodeSequence = Sequence([_code_item(value)])
    return item


def _hash_source(source: bytes | BinaryIO, progress: Callable[[int], None] | None) -> PayloadInfo:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return PayloadInfo(len(source), hashlib.sha256(source).hexdigest())
    digest = hashlib.sha256()
    length = 0
    source.seek(0)
    while chunk := source.read(_CHUNK):
        digest.update(chunk)
        length += len(chunk)
        if progress:
            progress(len(chunk))
    source.seek(0)
    return PayloadInfo(length, digest.hexdigest())


def encode(
    onnx_payload: bytes | BinaryIO,
    card: ModelCard,
    *,
    max_payload: int = DEFAULT_MAX_PAYLOAD,
    verify: bool = True,
    progress: Callable[[int], None] | None = None,
) -> Dataset:
    """Build the model object for ``onnx_payload`` (bytes, or a binary file opened for reading).

    A file object is not read into memory: the dataset keeps it, wrapped in an
    ``_EvenLengthReader``, as a buffered OB value and pydicom streams it when the dataset is
    written, so callers must keep it open until then. Either way the OB value has even length
    (an odd payload gets one trailing 00H) and the length element holds the true payload length.
    With ``verify`` the payload is checked exactly as :func:`decode` would check it, so nothing
    that the node would later refuse can be packed.
    """
    info = _hash_source(onnx_payload, progress)
    if info.length > max_payload:
        raise PayloadTooLarge(
            f"ONNX payload is {info.length} bytes, over the limit of {max_payload} bytes "
            "(raise models.max_payload_bytes in the configuration to accept it)"
        )
    if info.length == 0:
        raise InvalidOnnx("ONNX payload is empty")
    if verify:
        _verify_onnx(onnx_payload, card)
    if not card.identity.uid:
        card = replace(card, identity=replace(card.identity, uid=model_uid(card.identity.name, card.identity.version, info.sha256)))
    ident, target = card.identity, card.target
    created = _dt.date.fromisoformat(ident.created)

    ds = Dataset()
    # Patient: the model library.
    ds.PatientName = LIBRARY_PATIENT_NAME
    ds.PatientID = LIBRARY_PATIENT_ID
    ds.PatientBirthDate = ""
    ds.PatientSex = ""
    # General Study: one study per model name.
    ds.StudyInstanceUID = library_study_uid(ident.name)
    ds.StudyDate = created.strftime("%Y%m%d")
    ds.StudyTime = "000000"
    ds.ReferringPhysicianName = ""
    ds.StudyID = "MODELS"
    ds.AccessionNumber = ""
    ds.StudyDescription = ident.name[:64]
    if target.findings:
        ds.ReasonForPerformedProcedureCodeSequence = Sequence([_code_item(c) for c in target.findings])
    # General Series: one series per version, carrying the metadata a PACS indexes.
    ds.SeriesInstanceUID = library_series_uid(ident.uid)
    ds.SeriesNumber = 1
    ds.SeriesDate = ds.StudyDate
    ds.SeriesTime = ds.StudyTime
    ds.Modality = target.modalities[0]
    ds.SeriesDescription = f"{ident.name} {ident.version}"[:64]
    if target.body_parts:
        ds.BodyPartExamined = target.body_parts[0]
    if target.laterality:
        ds.Laterality = target.laterality if target.laterality in ("L", "R") else ""
    # General Equipment: who made the model and which version it is.
    ds.Manufacturer = ident.manufacturer[:64]
    ds.ManufacturerModelName = ident.name[:64]
    ds.SoftwareVersions = ident.version
    # Acquisition Context: coded anatomy and findings, the node's indexed search keys.
    items = [_context_item(TARGET_REGION, c) for c in target.anatomy]
    items += [_context_item(FINDING, c) for c in target.findings]
    ds.AcquisitionContextSequence = Sequence(items)
    # Raw Data.
    ds.ContentDate = ds.StudyDate
    ds.ContentTime = "000000"
    ds.AcquisitionDateTime = ds.StudyDate + "000000"
    ds.CreatorVersionUID = CREATOR_VERSION_UID
    ds.InstanceNumber = 1
    ds.ContentLabel = CONTENT_LABEL
    ds.ContentDescription = ident.intended_use[:64]
    # SOP Common.
    ds.SOPClassUID = RAW_DATA_STORAGE
    ds.SOPInstanceUID = ident.uid
    ds.SpecificCharacterSet = "ISO_IR 192"
    if card.provenance.parent_uid:
        # A new version links to the instance it was derived from.
        ref = Dataset()
        ref.ReferencedSOPClassUID = RAW_DATA_STORAGE
        ref.ReferencedSOPInstanceUID = card.provenance.parent_uid
        ds.ReferencedInstanceSequence = Sequence([ref])
        ds.ReferencedInstanceSequence[0].PurposeOfReferenceCodeSequence = Sequence(
            [_code_item(PARENT_MODEL_PURPOSE)]
        )

    block = ds.private_block(PRIVATE_GROUP, PRIVATE_CREATOR, create=True)
    block.add_new(EL_FORMAT, "CS", PAYLOAD_FORMAT)
    block.add_new(EL_LENGTH, "UL", info.length)
    block.add_new(EL_SHA256, "LO", info.sha256)
    block.add_new(EL_SCHEMA, "LO", card.schema)
    block.add_new(EL_CARD, "UT", card.to_json())
    payload: bytes | _EvenLengthReader
    if isinstance(onnx_payload, (bytes, bytearray, memoryview)):
        # pydicom pads a bytes value itself and writes the padded length.
        payload = bytes(onnx_payload)
    else:
        # For a buffered value pydicom writes the buffer's own length, odd or not, and then a pad
        # byte after it (0.1.0's bug): hand it a buffer that is already even.
        payload = _EvenLengthReader(onnx_payload, info.length)
    block.add_new(EL_PAYLOAD, "OB", payload)

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
    ds.file_meta = meta
    return ds


def write(ds: Dataset, path: str | Path) -> None:
    """Write a model object atomically, always in Explicit VR Little Endian."""
    path = Path(path)
    with _atomic_output(path) as fh:
        ds.save_as(fh, enforce_file_format=True, implicit_vr=False, little_endian=True)


def pack_file(
    onnx_path: str | Path,
    card: ModelCard,
    out_path: str | Path,
    *,
    max_payload: int = DEFAULT_MAX_PAYLOAD,
    progress: Callable[[int], None] | None = None,
) -> Dataset:
    """Pack an ONNX file into a model object file, streaming the weights (never all in memory twice)."""
    onnx_path = Path(onnx_path)
    size = onnx_path.stat().st_size
    if size > max_payload:
        raise PayloadTooLarge(
            f"{onnx_path} is {size} bytes, over the limit of {max_payload} bytes "
            "(raise models.max_payload_bytes in the configuration to accept it)"
        )
    with open(onnx_path, "rb") as fh:
        ds = encode(fh, card, max_payload=max_payload, progress=progress)
        write(ds, out_path)
    return ds


# --------------------------------------------------------------------------- decode


def _find_block_start(ds: Dataset) -> int | None:
    """Element number of our block's first element, found by its Private Creator value."""
    for elem_no in range(0x10, 0x100):
        tag = (PRIVATE_GROUP << 16) | elem_no
        if tag not in ds:
            continue
        if _text(ds[tag]) == PRIVATE_CREATOR:
            return elem_no << 8
    return None


def _raw_bytes(elem: DataElement) -> bytes:
    value = elem.value
    if value is None:
        return b""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, str):
        return value.encode("utf-8")
    raise TypeError(f"unexpected value type {type(value).__name__}")


def _text(elem: DataElement) -> str:
    """An element's text, whether it came back with its VR or as UN (Implicit VR round trip)."""
    value = elem.value
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8", errors="strict").rstrip("\x00 ")
    if value is None:
        return ""
    return str(value).rstrip("\x00 ")


def _uint(elem: DataElement) -> int:
    value = elem.value
    if isinstance(value, (bytes, bytearray)):
        if len(value) != 4:
            raise NotAModelObject(f"payload length element has {len(value)} bytes, expected 4")
        return int.from_bytes(value, "little")
    return int(value)


@dataclass(frozen=True)
class _Header:
    block: int
    length: int
    sha256: str
    card: ModelCard


def _read_header(ds: Dataset, max_payload: int) -> _Header:
    if ds.get("SOPClassUID") not in (RAW_DATA_STORAGE, None):
        raise NotAModelObject(f"SOP Class {ds.SOPClassUID} is not Raw Data Storage")
    start = _find_block_start(ds)
    if start is None:
        raise NotAModelObject(
            f"no private block '{PRIVATE_CREATOR}' in group {PRIVATE_GROUP:04X}: not a modelnode model object"
        )

    def element(offset: int, what: str) -> DataElement:
        tag = (PRIVATE_GROUP << 16) | start | offset
        if tag not in ds:
            raise NotAModelObject(f"model object lacks its {what} element ({tag:08X})")
        return ds[tag]

    fmt = _text(element(EL_FORMAT, "payload format"))
    if fmt != PAYLOAD_FORMAT:
        raise NotAModelObject(f"payload format is {fmt!r}, this node runs only {PAYLOAD_FORMAT}")
    length = _uint(element(EL_LENGTH, "payload length"))
    if length > max_payload:
        raise PayloadTooLarge(f"model payload is {length} bytes, over the limit of {max_payload} bytes")
    sha = _text(element(EL_SHA256, "payload SHA-256")).lower()
    if not _HEX64.match(sha):
        raise ChecksumMismatch(f"recorded payload checksum {sha[:80]!r} is not a SHA-256 hex digest")
    try:
        card = card_from_json(_text(element(EL_CARD, "model card")))
    except CardError as exc:
        raise InvalidCard(exc) from exc
    except UnicodeDecodeError as exc:
        raise InvalidCard(CardError("<card>", f"card is not UTF-8: {exc}")) from exc
    if card.identity.uid and ds.get("SOPInstanceUID") and card.identity.uid != ds.SOPInstanceUID:
        raise InvalidCard(
            CardError("identity.uid", f"{card.identity.uid} differs from the SOP Instance UID {ds.SOPInstanceUID}")
        )
    return _Header(start, length, sha, card)


def _check_digest(header: _Header, length: int, sha256: str) -> None:
    if length < header.length:
        raise TruncatedPayload(f"model payload is truncated: {length} of {header.length} bytes present")
    if length > header.length:
        raise TruncatedPayload(f"model payload has {length} bytes but its recorded length is {header.length}")
    if sha256 != header.sha256:
        raise ChecksumMismatch(
            f"model payload SHA-256 {sha256} does not match the recorded {header.sha256}: "
            "the payload or its checksum was altered"
        )


def decode(ds: Dataset, *, max_payload: int = DEFAULT_MAX_PAYLOAD) -> tuple[bytes, ModelCard]:
    """Verify a model object and return ``(onnx_bytes, card)``.

    Checks, in order: it is our object, the payload is within ``max_payload``, the card is
    valid, the length and SHA-256 match, ``onnx.checker`` passes, the graph agrees with the card.
    Raises a :class:`ModelObjectError` subclass naming what failed.
    """
    header = _read_header(ds, max_payload)
    tag = (PRIVATE_GROUP << 16) | header.block | EL_PAYLOAD
    if tag not in ds:
        raise TruncatedPayload("model object has no payload element: the file is truncated or stripped")
    payload = _raw_bytes(ds[tag])
    # An odd payload's OB value carries one pad byte past the recorded length. 0.1.0 wrote the
    # odd length itself (the stray pad byte then follows the element): exactly the recorded length.
    if len(payload) == header.length + 1 and header.length % 2 == 1:
        payload = payload[:-1]
    _check_digest(header, len(payload), hashlib.sha256(payload).hexdigest())
    _verify_onnx(payload, header.card)
    return payload, header.card


def read_card(ds: Dataset, *, max_payload: int = DEFAULT_MAX_PAYLOAD) -> tuple[ModelCard, PayloadInfo]:
    """The card and recorded payload facts, without touching or verifying the payload."""
    header = _read_header(ds, max_payload)
    return header.card, PayloadInfo(header.length, header.sha256)


def read_file(path: str | Path) -> Dataset:
    """Read a model object lazily: the payload stays on disk until asked for."""
    try:
        return pydicom.dcmread(path, defer_size="256 KB")
    except (InvalidDicomError, EOFError, OSError, ValueError) as exc:
        raise NotAModelObject(f"{path} is not a readable DICOM file: {exc}") from exc


def unpack_file(
    dcm_path: str | Path,
    out_path: str | Path | None,
    *,
    max_payload: int = DEFAULT_MAX_PAYLOAD,
    progress: Callable[[int], None] | None = None,
) -> ModelCard:
    """Verify a model object file and write its ONNX payload to ``out_path``.

    The payload is streamed from the file to a temporary output while it is hashed, checked
    with ``onnx.checker`` from disk, then renamed into place: nothing unverified appears at
    ``out_path``, and the weights are never held in memory more than once (by the checker).
    With ``out_path`` None the object is verified only.
    """
    dcm_path = Path(dcm_path)
    ds = read_file(dcm_path)
    header = _read_header(ds, max_payload)
    tag = (PRIVATE_GROUP << 16) | header.block | EL_PAYLOAD
    raw = ds.get_item(tag, keep_deferred=True) if tag in ds else None
    if raw is None:
        raise TruncatedPayload(f"{dcm_path} has no payload element: the file is truncated or stripped")
    value_tell = getattr(raw, "value_tell", None)
    deferred = getattr(raw, "value", b"") is None and value_tell is not None
    target = Path(out_path) if out_path is not None else None
    with _atomic_output(target or Path(tempfile.gettempdir()) / "modelnode-verify.onnx", keep=target is not None) as out:
        digest = hashlib.sha256()
        copied = 0
        if deferred:
            # Stream straight from the file: the value was never loaded by pydicom.
            declared = raw.length
            want = header.length
            with open(dcm_path, "rb") as src:
                src.seek(value_tell)
                remaining = min(want, declared)
                while remaining > 0:
                    chunk = src.read(min(_CHUNK, remaining))
                    if not chunk:
                        break
                    digest.update(chunk)
                    out.write(chunk)
                    copied += len(chunk)
                    remaining -= len(chunk)
                    if progress:
                        progress(len(chunk))
            if declared < want:
                copied = declared
        else:
            payload = _raw_bytes(ds[tag])
            if len(payload) == header.length + 1 and header.length % 2 == 1:
                payload = payload[:-1]
            digest.update(payload)
            out.write(payload)
            copied = len(payload)
            if progress:
                progress(len(payload))
        _check_digest(header, copied, digest.hexdigest())
        out.flush()
        _verify_onnx(Path(out.name), header.card)
    return header.card


# Payloads up to this size are verified in memory by verify(); larger ones from a temporary file.
IN_MEMORY_VERIFY = 64 << 20


def _load_deferred_block(ds: Dataset, path: Path) -> None:
    """Read the values of our block's elements (but the payload) that were left on disk.

    A dataset parsed with ``defer_size`` keeps large values (a long card) as raw elements with
    their file offset; they are read here from ``path``, the file the dataset was parsed from,
    so that :func:`_read_header` never depends on pydicom reopening a file it may not know.
    """
    start = _find_block_start(ds)
    if start is None:
        return
    for offset in (EL_FORMAT, EL_LENGTH, EL_SHA256, EL_SCHEMA, EL_CARD):
        tag = (PRIVATE_GROUP << 16) | start | offset
        raw = ds._dict.get(tag)
        if (raw is None or getattr(raw, "value", b"") is not None or getattr(raw, "value_tell", None) is None
                or raw.length == 0xFFFFFFFF):
            continue
        with open(path, "rb") as fh:
            fh.seek(raw.value_tell)
            ds._dict[tag] = raw._replace(value=fh.read(raw.length))


def verify(ds: Dataset, path: str | Path, *, max_payload: int = DEFAULT_MAX_PAYLOAD) -> tuple[ModelCard, PayloadInfo]:
    """Verify a model object already parsed from ``path``, as :func:`unpack_file` does, without
    parsing the file again; returns its card and payload facts.

    For the Storage SCP, which has parsed the received file to check it (values above a few
    KiB left on disk, at their offsets in ``path``). Checks, in order: our object, the payload
    within ``max_payload``, the card, the payload's length and SHA-256 (computed here over its
    bytes), ``onnx.checker``, the graph's signature against the card. A payload up to
    :data:`IN_MEMORY_VERIFY` is read into memory and checked from there (no temporary file);
    a larger one goes through :func:`unpack_file`. ``onnx.checker`` runs once per payload digest
    in this process: a digest this process computed and matched is the same bytes, which the
    checker has passed already (the card is compared with the graph every time).
    """
    path = Path(path)
    _load_deferred_block(ds, path)
    header = _read_header(ds, max_payload)
    tag = (PRIVATE_GROUP << 16) | header.block | EL_PAYLOAD
    raw = ds.get_item(tag, keep_deferred=True) if tag in ds else None
    if raw is None:
        raise TruncatedPayload(f"{path} has no payload element: the file is truncated or stripped")
    value_tell = getattr(raw, "value_tell", None)
    if getattr(raw, "value", b"") is None and value_tell is not None:  # left on disk
        want = min(header.length, raw.length)
        if want > IN_MEMORY_VERIFY:
            return unpack_file(path, None, max_payload=max_payload), PayloadInfo(header.length, header.sha256)
        with open(path, "rb") as fh:
            fh.seek(value_tell)
            payload = fh.read(want)
    else:
        payload = _raw_bytes(ds[tag])
        if len(payload) == header.length + 1 and header.length % 2 == 1:
            payload = payload[:-1]
    computed = hashlib.sha256(payload).hexdigest()
    _check_digest(header, len(payload), computed)
    _verify_onnx_bytes(payload, computed, header.card)
    return header.card, PayloadInfo(header.length, header.sha256)


@dataclass(frozen=True)
class RepairResult:
    """What :func:`repair_file` did: ``changes`` names each fix, empty if none was needed."""

    card: ModelCard
    uid: str
    length: int
    changes: tuple[str, ...]

    @property
    def was_conformant(self) -> bool:
        return not self.changes


def repair_file(
    dcm_path: str | Path,
    out_path: str | Path,
    *,
    max_payload: int = DEFAULT_MAX_PAYLOAD,
    progress: Callable[[int], None] | None = None,
) -> RepairResult:
    """Rewrite a model object with an even-length payload value, keeping everything else.

    0.1.0 wrote an odd payload's OB value with its odd length and a stray pad byte after it, which
    dcmtk and dicom3tools refuse to read. The object is verified exactly as :func:`unpack_file`
    verifies it, its verified payload is streamed into a temporary file beside ``out_path``, and
    the object is written from that file with the same SOP Instance UID and attributes, in
    Explicit VR Little Endian, the private elements with their own VRs even if they arrived as UN.
    The output appears atomically. An object that needed no fix is written as pydicom read it:
    byte for byte the same for one that modelnode wrote.
    ``progress`` sees the payload twice: verifying, then writing.
    """
    dcm_path, out_path = Path(dcm_path), Path(out_path)
    ds = read_file(dcm_path)
    changes: list[str] = []
    start = _find_block_start(ds)
    for offset in _VRS if start is not None else ():
        # A PACS without our dictionary may have returned the block as UN (Explicit VR). Look
        # before _read_header parses the elements and pydicom gives them their dictionary VRs.
        raw_elem = ds.get_item((PRIVATE_GROUP << 16) | start | offset, keep_deferred=True)
        if raw_elem is not None and raw_elem.VR == "UN":
            changes.append(f"({PRIVATE_GROUP:04X},{start | offset:04X}) UN -> {_VRS[offset]}")
    header = _read_header(ds, max_payload)
    tag = (PRIVATE_GROUP << 16) | header.block | EL_PAYLOAD
    raw = ds.get_item(tag, keep_deferred=True) if tag in ds else None
    if raw is None:
        raise TruncatedPayload(f"{dcm_path} has no payload element: truncated or stripped")
    if raw.length % 2:
        changes.append(f"payload value length {raw.length} is odd: padded to {raw.length + 1}")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out_path.name}.", dir=out_path.parent) as tmp:
        verified = Path(tmp) / "payload.onnx"
        card = unpack_file(dcm_path, verified, max_payload=max_payload, progress=progress)
        for offset in (EL_FORMAT, EL_LENGTH, EL_SHA256, EL_SCHEMA, EL_CARD):
            elem_tag = tag - EL_PAYLOAD + offset
            # Parsing it (ds[...]) gives a UN element its dictionary VR; left raw, pydicom would
            # write it back as UN. Should the lookup not apply, set the VR ourselves.
            if elem_tag in ds and ds[elem_tag].VR != _VRS[offset]:
                elem = ds[elem_tag]
                value = _uint(elem) if offset == EL_LENGTH else _text(elem)
                ds[elem_tag] = DataElement(elem_tag, _VRS[offset], value)
        meta = ds.file_meta
        if meta.get("TransferSyntaxUID") != ExplicitVRLittleEndian:
            was = meta.get("TransferSyntaxUID")
            changes.append(f"transfer syntax {was} -> {ExplicitVRLittleEndian}")
            meta.TransferSyntaxUID = ExplicitVRLittleEndian
        # PS3.10 7.1: the implementation named in the file meta is the one that wrote the file.
        if meta.get("ImplementationClassUID") != IMPLEMENTATION_CLASS_UID or (
            meta.get("ImplementationVersionName") != IMPLEMENTATION_VERSION_NAME
        ):
            changes.append(f"written by {IMPLEMENTATION_VERSION_NAME}")
            meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
            meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
        with open(verified, "rb") as fh:
            ds[tag] = DataElement(tag, "OB", _EvenLengthReader(fh, header.length, progress))
            write(ds, out_path)
    return RepairResult(card, str(ds.SOPInstanceUID), header.length, tuple(changes))


# --------------------------------------------------------------------------- ONNX checks


def _verify_onnx(payload: bytes | BinaryIO | Path, card: ModelCard) -> None:
    """Run onnx.checker and compare the graph's signature with the card."""
    inputs, outputs = _checked_signature(payload)
    _check_signature(inputs, outputs, card)


def _checked_signature(payload: bytes | BinaryIO | Path) -> tuple[list, list]:
    """onnx.checker on ``payload``; the graph's inputs (initializers left out) and outputs."""
    try:
        if isinstance(payload, Path):
            onnx.checker.check_model(str(payload))
            model = onnx.load(str(payload), load_external_data=False)
        elif isinstance(payload, (bytes, bytearray)):
            onnx.checker.check_model(bytes(payload))
            model = onnx.load_model_from_string(bytes(payload))
        else:
            name = getattr(payload, "name", None)
            if isinstance(name, str) and os.path.exists(name):
                onnx.checker.check_model(name)
                model = onnx.load(name, load_external_data=False)
            else:
                payload.seek(0)
                data = payload.read()
                payload.seek(0)
                onnx.checker.check_model(data)
                model = onnx.load_model_from_string(data)
    except (onnx.checker.ValidationError, onnx.onnx_cpp2py_export.checker.ValidationError) as exc:  # type: ignore[attr-defined]
        raise InvalidOnnx(f"payload fails onnx.checker: {str(exc).splitlines()[0]}") from exc
    except Exception as exc:  # protobuf DecodeError and friends: not an ONNX file at all
        raise InvalidOnnx(f"payload is not an ONNX model: {type(exc).__name__}: {exc}") from exc
    graph = model.graph
    # Initializers may be listed as inputs in old exports; they are not fed by the caller.
    inits = {i.name for i in graph.initializer}
    # Copies: a sub-message would keep the whole model (its weights) alive while cached.
    inputs = [_copy_value_info(i) for i in graph.input if i.name not in inits]
    outputs = [_copy_value_info(o) for o in graph.output]
    del model, graph
    return inputs, outputs


def _copy_value_info(info: onnx.ValueInfoProto) -> onnx.ValueInfoProto:
    out = onnx.ValueInfoProto()
    out.CopyFrom(info)
    return out


# The signatures of payloads that passed onnx.checker, by the SHA-256 this process computed over
# their bytes (see verify()). A payload with the same digest is the same bytes, so checking it
# again could only give the same answer; the card is still compared with the signature each time.
_CHECKED_MAX = 256
_checked: OrderedDict[str, tuple[list, list]] = OrderedDict()
_checked_lock = threading.Lock()


def _verify_onnx_bytes(payload: bytes, computed_sha256: str, card: ModelCard) -> None:
    """:func:`_verify_onnx` for bytes whose SHA-256 was just computed from them, checked once per digest."""
    with _checked_lock:
        signature = _checked.get(computed_sha256)
        if signature is not None:
            _checked.move_to_end(computed_sha256)
    if signature is None:
        signature = _checked_signature(payload)
        with _checked_lock:
            _checked[computed_sha256] = signature
            while len(_checked) > _CHECKED_MAX:
                _checked.popitem(last=False)
    _check_signature(*signature, card)


def _dims(value_info: onnx.ValueInfoProto) -> list[int | None]:
    shape = value_info.type.tensor_type.shape
    return [d.dim_value if d.HasField("dim_value") else None for d in shape.dim]


_ONNX_DTYPES = {"float32": onnx.TensorProto.FLOAT, "float16": onnx.TensorProto.FLOAT16,
                "uint8": onnx.TensorProto.UINT8, "int16": onnx.TensorProto.INT16}


def _check_signature(inputs: list, outputs: list, card: ModelCard) -> None:
    if len(inputs) != 1:
        raise ShapeMismatch(f"graph has {len(inputs)} inputs; the card describes one image input")
    if len(outputs) < 1:
        raise ShapeMismatch("graph has no outputs")
    inp = inputs[0]
    spec = card.input
    elem_type = inp.type.tensor_type.elem_type
    if elem_type != _ONNX_DTYPES[spec.dtype]:
        raise ShapeMismatch(
            f"graph input '{inp.name}' has element type {onnx.TensorProto.DataType.Name(elem_type)}, "
            f"card input.dtype is {spec.dtype}"
        )
    dims = _dims(inp)
    rank = 4 if spec.layout == "2d" else 5
    if len(dims) != rank:
        raise ShapeMismatch(
            f"graph input '{inp.name}' has rank {len(dims)} {dims}; a {spec.layout} card needs rank {rank} (N, C, spatial...)"
        )
    if dims[1] is not None and dims[1] != spec.channels:
        raise ShapeMismatch(f"graph input '{inp.name}' has {dims[1]} channels, card input.channels is {spec.channels}")
    for axis, (g, c) in enumerate(zip(dims[2:], spec.size, strict=True)):
        if g is not None and c is not None and g != c:
            raise ShapeMismatch(
                f"graph input '{inp.name}' spatial axis {axis} is {g}, card input.size says {c}"
            )
        if g is not None and c is None:
            raise ShapeMismatch(
                f"graph input '{inp.name}' spatial axis {axis} is fixed at {g}, card input.size says dynamic"
            )
    out = outputs[0]
    odims = _dims(out)
    k = card.output_count
    if card.task.type == "segmentation":
        if len(odims) != rank:
            raise ShapeMismatch(f"segmentation output '{out.name}' has rank {len(odims)}; expected {rank}")
        if odims[1] is not None and odims[1] != k:
            detail = f"{k - 1} exclusive classes + background" if card.task.exclusive else f"{k} classes"
            raise ShapeMismatch(f"segmentation output '{out.name}' has {odims[1]} channels, card has {detail}")
    else:
        if len(odims) != 2:
            raise ShapeMismatch(f"classification output '{out.name}' has rank {len(odims)}; expected 2 (N, classes)")
        if odims[1] is not None and odims[1] != k:
            raise ShapeMismatch(f"classification output '{out.name}' has {odims[1]} classes, card has {k}")


# --------------------------------------------------------------------------- files


@contextmanager
def _atomic_output(path: Path, keep: bool = True) -> Iterator[BinaryIO]:
    """A temporary file beside ``path``, fsynced and renamed into place only on success."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    os.close(fd)
    # mkstemp creates 0600; give the output the mode a plain open() would (0666 & ~umask).
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    try:
        with open(tmp, "w+b") as fh:
            yield fh
            fh.flush()
            if keep:  # (a file only verified and deleted needs no durability)
                os.fsync(fh.fileno())
        if keep:
            os.replace(tmp, path)
            _fsync_dir(path.parent)
        else:
            os.unlink(tmp)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

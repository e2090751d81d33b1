"""Sending stored files over an association: byte-exact, or converted to a syntax the peer accepted.

Used by the client's C-STORE (:func:`node.scu.client.store`) and by the node itself: C-MOVE and
C-GET sub-operations (node.dimse.retrieve_scp) go through :func:`send_file`.

Byte-exact sending: pynetdicom's ``send_c_store`` re-encodes a ``Dataset`` it is given. pydicom
writes back what it read for most files, but not all: it drops group-length elements, turns
``UN`` into known VRs and so on, so a store-then-retrieve round trip would not always be
byte-for-byte. With ``_config.STORE_SEND_CHUNKED_DATASET`` set, ``send_c_store`` given a *path*
streams the file's dataset bytes as they are (after the File Meta), which needs a presentation
context accepted in exactly the file's transfer syntax. :func:`send_file` does that when the
peer accepted the stored syntax and otherwise converts (decompressing where pydicom can) into a
temporary file in a syntax the peer accepted; model objects only ever go out in Explicit VR
Little Endian.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import (
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pynetdicom.association import Association
from pynetdicom.dsutils import split_dataset
from pynetdicom.presentation import PresentationContext, build_context

from node.dimse.compat import client as compat_client
from node.dimse.syntaxes import UNCOMPRESSED

log = logging.getLogger("modelnode.scu")


MAX_CONTEXTS = 128  # PS3.8: presentation context IDs are odd numbers 1-255


class SendRefused(ValueError):
    """One C-STORE cannot be made on this association (no usable presentation context, or a
    conversion the node cannot do). pynetdicom counts it as a failed sub-operation."""



@dataclass(frozen=True)
class FileInfo:
    path: Path
    sop_class: UID
    sop_instance: UID
    transfer_syntax: UID
    has_meta: bool


def file_info(path: str | Path) -> FileInfo:
    """SOP class, instance and transfer syntax of a DICOM file, from its File Meta when it has one."""
    path = Path(path)
    try:
        meta, _ = split_dataset(path)
    except (InvalidDicomError, OSError, EOFError, ValueError, AttributeError) as exc:
        raise ValueError(f"{path}: not a DICOM file: {exc}") from exc
    if all(k in meta for k in ("MediaStorageSOPClassUID", "MediaStorageSOPInstanceUID", "TransferSyntaxUID")):
        return FileInfo(path, UID(meta.MediaStorageSOPClassUID), UID(meta.MediaStorageSOPInstanceUID),
                        UID(meta.TransferSyntaxUID), True)
    # No File Meta (or an incomplete one): read the dataset itself to learn what it is.
    try:
        ds = pydicom.dcmread(path, force=True, stop_before_pixels=True)
        sop_class, sop_uid = UID(ds.SOPClassUID), UID(ds.SOPInstanceUID)
    except Exception as exc:  # noqa: BLE001 (pydicom raises many types for garbage)
        raise ValueError(f"{path}: not a DICOM file: {exc}") from exc
    implicit, little = ds.original_encoding
    ts = ImplicitVRLittleEndian if implicit else (ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
    return FileInfo(path, sop_class, sop_uid, ts, False)


def outgoing_syntax(accepted: Iterable[str], stored: str, *, model: bool) -> UID | None:
    """The transfer syntax to send a file in, given what the peer accepted for its SOP class."""
    accepted = {UID(t) for t in accepted}
    if model:
        return ExplicitVRLittleEndian if ExplicitVRLittleEndian in accepted else None
    if stored in accepted:
        return UID(stored)
    for ts in UNCOMPRESSED:
        if ts in accepted:
            return ts
    return None


def send_file(
    assoc: Association,
    info: FileInfo,
    *,
    model: bool = False,
    tmp_dir: str | Path | None = None,
    send: Callable[..., Dataset] | None = None,
    **kwargs: Any,
) -> Dataset:
    """C-STORE one file over ``assoc``, byte-exact when the peer accepted its transfer syntax.

    Otherwise the file is converted into a syntax the peer accepted (decompressed first if it
    must be) in a temporary file under ``tmp_dir``. Raises :class:`SendRefused` when neither is
    possible; returns the C-STORE response status dataset (empty if the association was lost).
    ``send`` is the original ``send_c_store`` when the association's own method is wrapped.
    """
    compat_client.install_client()
    send = send or assoc.send_c_store
    accepted = [cx.transfer_syntax[0] for cx in assoc.accepted_contexts
                if cx.abstract_syntax == info.sop_class and cx.as_scu]
    if not accepted:
        raise SendRefused(f"{info.sop_instance}: the peer accepted no presentation context for {info.sop_class.name}")
    target = outgoing_syntax(accepted, info.transfer_syntax, model=model)
    if target is None:
        if model:
            raise SendRefused(f"{info.sop_instance}: model objects go out in Explicit VR Little Endian only and the "
                              "peer did not accept it")
        raise SendRefused(f"{info.sop_instance}: the peer accepts {info.sop_class.name} only in "
                          f"{', '.join(UID(t).name for t in accepted)}, not {info.transfer_syntax.name}, and no "
                          "uncompressed syntax to convert to")
    if target == info.transfer_syntax and info.has_meta:
        return send(info.path, **kwargs)
    with _converted(info, target, tmp_dir) as path:
        log.info("%s: sending in %s (stored in %s, not accepted by the peer)", info.sop_instance, target.name,
                 info.transfer_syntax.name)
        return send(path, **kwargs)


@contextmanager
def _converted(info: FileInfo, target: UID, tmp_dir: str | Path | None) -> Iterator[Path]:
    """The file re-encoded in ``target`` (an uncompressed little-endian syntax), as a temporary file."""
    stored = info.transfer_syntax
    if stored == ExplicitVRBigEndian:
        # pydicom converts element values but not the bytes of OW pixel data: refuse, don't corrupt.
        raise SendRefused(f"{info.sop_instance}: stored in Explicit VR Big Endian, which the peer does not accept; "
                          "the node does not byte-swap pixel data")
    try:
        ds = pydicom.dcmread(info.path, force=not info.has_meta)
        if stored.is_compressed:
            ds.decompress()
    except Exception as exc:  # noqa: BLE001 (codec and plugin errors have no common base)
        raise SendRefused(f"{info.sop_instance}: cannot convert from {stored.name} to {target.name}: {exc}") from exc
    if not hasattr(ds, "file_meta") or ds.file_meta is None:
        ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = info.sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = info.sop_instance
    ds.file_meta.TransferSyntaxUID = target
    fd, name = tempfile.mkstemp(suffix=".dcm.part", dir=tmp_dir)
    os.close(fd)
    try:
        ds.save_as(name, enforce_file_format=True, implicit_vr=target.is_implicit_VR, little_endian=True)
        del ds
        yield Path(name)
    finally:
        Path(name).unlink(missing_ok=True)


def storage_contexts(items: Iterable[tuple[str, str, bool]]) -> list[PresentationContext]:
    """Presentation contexts to propose for sending files: (SOP class, stored syntax, is model).

    One context per stored syntax (so compressed files can go as they are) plus, for images, one
    uncompressed fallback per SOP class. Model objects: Explicit VR Little Endian only. Trimmed to
    128, the most used classes first.
    """
    counts: dict[tuple[str, str, bool], int] = {}
    for sop, ts, model in items:
        key = (str(sop), str(ts) if not model else str(ExplicitVRLittleEndian), bool(model))
        counts[key] = counts.get(key, 0) + 1
    exact = sorted(counts, key=lambda k: (-counts[k], k))
    contexts: list[PresentationContext] = []
    seen: set[tuple[str, tuple[str, ...]]] = set()

    def add(sop: str, syntaxes: list[str]) -> None:
        key = (sop, tuple(syntaxes))
        if key not in seen and len(contexts) < MAX_CONTEXTS:
            seen.add(key)
            contexts.append(build_context(sop, syntaxes))

    for sop, ts, _model in exact:
        add(sop, [ts])
    for sop, ts, model in exact:
        if not model and ts not in UNCOMPRESSED:
            add(sop, list(UNCOMPRESSED))
        elif not model:
            add(sop, [t for t in UNCOMPRESSED if t != ts])
    dropped = len(counts) - sum(1 for cx in contexts if len(cx.transfer_syntax) == 1)
    if dropped > 0:
        log.warning("%d SOP class/transfer syntax pair(s) left out: more than %d presentation contexts", dropped,
                    MAX_CONTEXTS)
    return contexts

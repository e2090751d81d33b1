"""Result objects: what a model's output becomes before it goes back to the PACS.

* Segmentation models produce a **DICOM Segmentation** with one segment per card class, BINARY
  (Segmentation Storage, the default) or LABELMAP (Label Map Segmentation Storage, Supplement 243,
  for mutually exclusive classes): label, SNOMED CT category and type from the card, algorithm type AUTOMATIC and the
  Segmentation Algorithm Identification (name, version, family "Artificial Intelligence", source =
  the model's manufacturer, parameters ``model_uid=<model SOP Instance UID>,threshold=<t>``).
  Frames are the source slices, so geometry (plane positions, orientation, pixel measures,
  Frame of Reference, per-frame Derivation Image references) comes from the source images
  themselves; empty frames are omitted.
* Classification models produce a **Comprehensive 3D SR** in TID 1500 (Measurement Report): the
  model as the device observer, an Image Library of the source images, and one TID 1501
  measurement group per class, sorted most probable first. Each group carries the class's
  category and type (Finding Category / Finding), Algorithm Identification (TID 4019), the
  decision as "Presence of property" = Present/Absent and the probability as "Certainty of
  Finding" in percent.

Both carry Contributing Equipment (the source's acquisition equipment and highdicom, added by
highdicom; modelnode and the model itself, added here as Processing Equipment) and keep the
source's patient and study, so the result lands in the source study.

Result UIDs are derived from (kind, source series, model) by :func:`result_uids`: running the same
model on the same series again yields the same SOP Instance UID, so the PACS replaces the earlier
result instead of accumulating copies. See docs/results.md.
"""

from __future__ import annotations

import datetime as _dt
import logging
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _package_version
from typing import Any, Literal

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code as SRCode
from pydicom.tag import Tag
from pydicom.uid import UID

from iods.card import Code, ModelCard, OutputClass
from iods.uids import derived_uid

__all__ = [
    "AI_FAMILY",
    "CERTAINTY_OF_FINDING",
    "GROUP_SOURCE_LIMIT",
    "NODE_MANUFACTURER",
    "PROCESSING_EQUIPMENT",
    "SEGMENTATION_TYPES",
    "ResultKind",
    "ResultError",
    "build_classification_sr",
    "build_segmentation",
    "contributing_equipment",
    "node_software_version",
    "result_series_description",
    "result_series_number",
    "result_uids",
]

log = logging.getLogger(__name__)

ResultKind = Literal["SEG", "SR"]
_KINDS: tuple[str, ...] = ("SEG", "SR")
# How a SEG encodes its segments: BINARY, one 1-bit frame per (plane, segment) with pixels, which
# every SEG-aware viewer reads; LABELMAP, one 8- or 16-bit frame per plane holding the segment
# number, for mutually exclusive segments. FRACTIONAL is left out on purpose (docs/results.md).
# node.config keeps a copy of this tuple so that loading the configuration does not import
# highdicom (0.45 s on every CLI command); tests/test_results_labelmap.py checks they agree.
SEGMENTATION_TYPES: tuple[str, ...] = ("BINARY", "LABELMAP")

NODE_MANUFACTURER = "modelnode"
NODE_MODEL_NAME = "modelnode"
DEFAULT_STATION_NAME = "MODELNODE"

# DCM 123110 "Artificial Intelligence" (CID 7162 Algorithm Families).
AI_FAMILY = codes.cid7162.ArtificialIntelligence
# DCM 109102 "Processing Equipment" (CID 7005 Contributing Equipment Purposes of Reference).
PROCESSING_EQUIPMENT = codes.DCM.ProcessingEquipment
# DCM 111012 "Certainty of Finding" (CID 6048): the concept CAD SR uses for a detector's
# confidence in a finding; a probability in percent reads naturally in SR viewers.
CERTAINTY_OF_FINDING = codes.DCM.CertaintyOfFinding
PERCENT = codes.UCUM.Percent
# DCM 121052 "Presence of property" with DCM 121053 "Present" / 121054 "Absent": the model's
# decision for the class (argmax for softmax heads, threshold for sigmoid heads).
PRESENCE = codes.DCM.PresenceOfProperty
PRESENT = codes.DCM.Present
ABSENT = codes.DCM.Absent
# SCT 363679005 "Imaging procedure" (CID 100): TID 1500 needs a procedure; the node does not
# know the clinical procedure beyond "an imaging study", and a wrong specific code is worse.
PROCEDURE_REPORTED = codes.SCT.ImagingProcedure
# Anatomy categories: a class whose category is one of these *is* the anatomy, so it gets no
# separate Finding Site; any other category (a finding, a lesion) is sited on the card's anatomy.
_ANATOMY_CATEGORIES = {"91723000", "123037004"}  # Anatomical Structure, Body structure

# Result series sort after the series they were made from in a viewer's series list.
SERIES_NUMBER_OFFSET: dict[str, int] = {"SEG": 1000, "SR": 2000}
# Up to this many source images, every SR measurement group lists them itself (what a reader
# of one group sees first); beyond it the groups rely on the Image Library.
GROUP_SOURCE_LIMIT = 16
_UID_NAMESPACE = "modelnode.result/1"  # bump only to re-key every result UID on purpose

# Recommended display colours (RGB) cycled over segments, so a viewer shows distinct overlays.
_PALETTE: tuple[tuple[int, int, int], ...] = (
    (230, 25, 75), (60, 180, 75), (67, 99, 216), (255, 225, 25), (245, 130, 49),
    (145, 30, 180), (66, 212, 244), (240, 50, 230), (191, 239, 69), (250, 190, 212),
)
# Up to this many classes, stacked masks are cheap to handle class by class (strided reads of a
# short last axis); beyond it, whole-axis operations win (measurements at _class_count and
# _segmentation_pixels).
_FEW_CLASSES = 8
_PIXEL_TAGS = {Tag("PixelData"), Tag("FloatPixelData"), Tag("DoubleFloatPixelData")}
# Type 2 patient/study attributes highdicom reads with attribute access: a source that left one
# out entirely (legal for some writers, common in the wild) would otherwise raise AttributeError.
_TYPE2_COPIED = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber",
    "StudyID", "StudyDate", "StudyTime", "ReferringPhysicianName",
)


class ResultError(ValueError):
    """The inputs cannot make a valid result object (shape, class count, values)."""


# --------------------------------------------------------------------------- identity helpers


def result_uids(source_series_uid: str, model_uid: str, kind: ResultKind) -> tuple[UID, UID]:
    """``(SeriesInstanceUID, SOPInstanceUID)`` of the result of ``model_uid`` on a series.

    Deterministic (RFC 4122 v5 under 2.25, see :mod:`iods.uids`): a re-run produces the same
    UIDs, so the PACS replaces the previous result instead of storing a duplicate. The kind is
    part of the key, so a model that produced both a SEG and an SR gets two series.
    """
    if kind not in _KINDS:
        raise ValueError(f"kind must be one of {_KINDS}, got {kind!r}")
    if not source_series_uid or not model_uid:
        raise ValueError("source_series_uid and model_uid must not be empty")
    series = derived_uid(_UID_NAMESPACE, "series", kind, str(source_series_uid), str(model_uid))
    instance = derived_uid(_UID_NAMESPACE, "instance", kind, str(source_series_uid), str(model_uid))
    return series, instance


def result_series_description(card: ModelCard) -> str:
    """``AI <model name> <version>``, cut to the 64 characters of a LO element."""
    return _lo(f"AI {card.identity.name} {card.identity.version}")


def result_series_number(source: Dataset, kind: ResultKind) -> int:
    """The source's SeriesNumber plus 1000 (SEG) or 2000 (SR): results list after their source."""
    try:
        base = int(source.get("SeriesNumber") or 0)
    except (TypeError, ValueError):
        base = 0
    # IS is a signed 32-bit value; a huge source number must not make the result invalid.
    return min(max(base, 0) + SERIES_NUMBER_OFFSET[kind], 2**31 - 1)


def node_software_version() -> str:
    """The installed modelnode version (SoftwareVersions of every result)."""
    try:
        return _package_version("modelnode")
    except PackageNotFoundError:  # running from a bare checkout
        return "0+unknown"


def contributing_equipment(
    card: ModelCard,
    model_uid: str,
    *,
    station_name: str = DEFAULT_STATION_NAME,
    when: _dt.datetime | None = None,
) -> list[hd.ContributingEquipment]:
    """Processing Equipment items for modelnode and for the model that made the result.

    highdicom adds the source's acquisition equipment and itself; these two say which node ran
    which model (the model's SOP Instance UID as its device serial number), so the provenance
    survives even where a viewer ignores the algorithm identification.
    """
    when = when or _dt.datetime.now()
    ident = card.identity
    node = hd.ContributingEquipment(
        manufacturer=NODE_MANUFACTURER,
        purpose_of_reference=PROCESSING_EQUIPMENT,
        manufacturer_model_name=NODE_MODEL_NAME,
        software_versions=node_software_version(),
        station_name=_sh(station_name),
        contribution_datetime=when,
        contribution_description="Selected the model for this series and ran it with ONNX Runtime",
    )
    model = hd.ContributingEquipment(
        manufacturer=_lo(ident.manufacturer),
        purpose_of_reference=PROCESSING_EQUIPMENT,
        manufacturer_model_name=_lo(ident.name),
        software_versions=_lo(ident.version),
        device_serial_number=_lo(model_uid),
        contribution_datetime=when,
        contribution_description=_st(
            f"Deep-learning model {ident.name} {ident.version}; "
            f"model object SOP Instance UID {model_uid}"
        ),
    )
    return [node, model]


# --------------------------------------------------------------------------- segmentation


def build_segmentation(
    source_images: Sequence[Dataset],
    masks: np.ndarray,
    card: ModelCard,
    model_uid: str,
    *,
    station_name: str = DEFAULT_STATION_NAME,
    series_number: int | None = None,
    content_datetime: _dt.datetime | None = None,
    segmentation_type: str = "BINARY",
) -> hd.seg.Segmentation:
    """A DICOM SEG of ``masks`` on ``source_images``, one segment per card class.

    ``source_images``: the series' single-frame instances in the order of the mask's first axis
    (the caller sorts slices), or exactly one multi-frame image whose frames are that axis, or
    one projection radiograph (CR/DX, no Frame of Reference). Pixel data need not be loaded.

    ``masks`` (the mask's rows and columns are the source's: resample back before calling):

    * ``[planes, rows, cols, classes]``: stacked masks, bool or 0/1 integers, or floating point
      probabilities thresholded here at each class's card threshold (``p >= threshold``);
    * ``[planes, rows, cols]``: a label map, 0 background and ``i`` the card's ``i``-th class;
    * ``[rows, cols]``: a label map of a single image.

    ``segmentation_type``:

    * ``"BINARY"`` (Segmentation Storage): one 1-bit frame per plane and class with pixels;
      classes may overlap. What PACS and viewers display today.
    * ``"LABELMAP"`` (Label Map Segmentation Storage, Supplement 243): one 8-bit frame per plane
      (16-bit beyond 255 classes) holding the class number, segment 0 "Background" added.
      Needs mutually exclusive classes: a label map always is; stacked masks that set a pixel
      in two classes are refused with :class:`ResultError`. Segment ``i`` is card class ``i``
      in both types, with the same descriptions and colours.

    Frames where a class is empty are omitted (a viewer then shows nothing there, which is the
    truth). A class with no pixels anywhere keeps its segment description with no frames, so
    the result still lists every class the model looked for. If every class is empty,
    highdicom encodes all (empty) frames, because a SEG must hold at least one frame; the object
    is still valid and says "the model ran and found nothing".
    """
    if card.task.type != "segmentation":
        raise ResultError(f"model {card.identity.name!r} is a {card.task.type} model, not segmentation")
    if segmentation_type not in SEGMENTATION_TYPES:
        raise ResultError(f"segmentation_type must be one of {SEGMENTATION_TYPES}, got {segmentation_type!r}")
    metas = _source_metadata(source_images)
    planes, rows, cols = _plane_grid(metas)
    pixels = _segmentation_pixels(masks, card.task.classes, (planes, rows, cols),
                                  labelmap=segmentation_type == "LABELMAP")

    first = metas[0]
    series_uid, instance_uid = result_uids(first.SeriesInstanceUID, model_uid, "SEG")
    when = content_datetime or _dt.datetime.now()
    descriptions = [
        _segment_description(number, cls, card, model_uid)
        for number, cls in enumerate(card.task.classes, start=1)
    ]
    seg = _Segmentation(
        source_images=metas,
        pixel_array=pixels,
        segmentation_type=hd.seg.SegmentationTypeValues(segmentation_type),
        segment_descriptions=descriptions,
        series_instance_uid=series_uid,
        series_number=series_number if series_number is not None else result_series_number(first, "SEG"),
        sop_instance_uid=instance_uid,
        instance_number=1,
        manufacturer=NODE_MANUFACTURER,
        manufacturer_model_name=NODE_MODEL_NAME,
        software_versions=node_software_version(),
        # The node instance is the "device"; its station name tells sites with several nodes apart.
        device_serial_number=_lo(station_name),
        content_label=_content_label(card.identity.name),
        content_description=_lo(f"{card.identity.name} {card.identity.version}"),
        series_description=result_series_description(card),
        contributing_equipment=contributing_equipment(
            card, model_uid, station_name=station_name, when=when
        ),
        omit_empty_frames=True,
        content_date=when.date(),
        content_time=when.time(),
    )
    seg.StationName = _sh(station_name)
    if "FrameOfReferenceUID" not in first:
        # General Image: Patient Orientation is type 2C, required when the image has no Frame
        # of Reference (a projection radiograph); highdicom leaves it to us. The SEG's pixels
        # are the source's, so the source's orientation labels hold for it unchanged.
        seg.PatientOrientation = first.get("PatientOrientation") or None
    return seg


class _Segmentation(hd.seg.Segmentation):
    """highdicom's Segmentation with a faster overlap check for stacked boolean BINARY masks.

    highdicom decides SegmentsOverlap for a [planes, rows, cols, segments] mask by summing it
    over the last axis into an int64 array: half a second for 60 slices of 512 x 512 with two
    classes, half the time of building the whole SEG. Counting per pixel in uint8
    (:func:`_class_count`) gives the same answer in a few tens of milliseconds. Anything else (label maps, and
    stacks without overlap, which build_segmentation turns into a label map first) goes to
    highdicom's own check; tests/test_results.py compares the two on overlapping and disjoint
    masks, and fails if highdicom stops calling this hook by that name.
    """

    @classmethod
    def _check_and_cast_pixel_array(cls, pixel_array: Any, segment_numbers: np.ndarray,
                                    segmentation_type: Any, dtype: type) -> tuple[Any, Any]:
        if (segmentation_type == hd.seg.SegmentationTypeValues.BINARY
                and isinstance(pixel_array, np.ndarray) and pixel_array.dtype == np.bool_ and pixel_array.ndim == 4
                and 1 < pixel_array.shape[-1] == len(segment_numbers) < 255):
            return pixel_array, _segments_overlap(pixel_array)
        return super()._check_and_cast_pixel_array(pixel_array, segment_numbers, segmentation_type, dtype)


def _segments_overlap(stacked: np.ndarray) -> hd.seg.SegmentsOverlapValues:
    """YES if any pixel belongs to two segments of a boolean [..., segments] stack, else NO."""
    overlap = bool(_class_count(stacked).max(initial=0) > 1)
    return hd.seg.SegmentsOverlapValues.YES if overlap else hd.seg.SegmentsOverlapValues.NO


def _class_count(stacked: np.ndarray) -> np.ndarray:
    """How many classes each pixel of a boolean [..., classes] stack belongs to."""
    # uint8 while the count cannot wrap around. Class by class for a few classes, one reduction
    # over the last axis for many: 120 x 512 x 512 with 3 classes 0.12 s against 0.41 s, with 20
    # classes 0.92 s against 0.57 s (the class-by-class reads are strided).
    dtype = np.uint8 if stacked.shape[-1] < 256 else np.uint16
    if stacked.shape[-1] > _FEW_CLASSES:
        return np.add.reduce(stacked.view(np.uint8), axis=-1, dtype=dtype)
    count = stacked[..., 0].astype(dtype)
    for k in range(1, stacked.shape[-1]):
        count += stacked[..., k]
    return count


def warm_up() -> None:
    """Load highdicom's tables of the standard (IOD and module maps, about 0.35 s of JSON) now.

    highdicom reads them on the first object it builds; the pipeline calls this when it starts
    so that the first study after a restart does not pay for it.
    """
    from highdicom import _standard_utils

    for name in ("get_module_attribute_map", "get_iod_module_map", "get_sop_class_iod_map"):
        loader = getattr(_standard_utils, name, None)
        if callable(loader):
            loader()


def _segment_description(
    number: int, cls: OutputClass, card: ModelCard, model_uid: str
) -> hd.seg.SegmentDescription:
    algorithm = hd.AlgorithmIdentificationSequence(
        name=_lo(card.identity.name),
        family=AI_FAMILY,
        version=_lo(card.identity.version),
        source=_lo(card.identity.manufacturer),
        # highdicom joins these as "k=v,k=v" into AlgorithmParameters (LT); model_uid first so a
        # reader can find the model that made the segment without parsing further.
        parameters={"model_uid": str(model_uid), "threshold": f"{cls.threshold:g}"},
    )
    return hd.seg.SegmentDescription(
        segment_number=number,
        segment_label=_lo(cls.label),
        segmented_property_category=_sr_code(cls.category),
        segmented_property_type=_sr_code(cls.type),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm,
        display_color=hd.color.CIELabColor.from_rgb(*_PALETTE[(number - 1) % len(_PALETTE)]),
    )


def _plane_grid(metas: Sequence[Dataset]) -> tuple[int, int, int]:
    """(planes, rows, cols) the mask must have: one plane per source instance or frame."""
    first = metas[0]
    frames = int(first.get("NumberOfFrames") or 1)
    if len(metas) > 1 and frames > 1:
        raise ResultError("pass either single-frame instances or exactly one multi-frame image")
    planes = frames if len(metas) == 1 else len(metas)
    return planes, int(first.Rows), int(first.Columns)


def _segmentation_pixels(
    masks: np.ndarray, classes: Sequence[OutputClass], grid: tuple[int, int, int], *, labelmap: bool
) -> np.ndarray:
    """``masks`` as highdicom should get them, checked against the source grid and the card.

    A label map, for either type: handed to highdicom as it is, a 120 x 512 x 512 map with 100
    classes becomes a BINARY SEG in about two seconds, where stacking it into 100 boolean masks
    first took 147 s and 6 GB (highdicom then slices every class out of the last, strided axis).
    Stacked masks become a label map too when no pixel is in two classes, for LABELMAP always
    and for BINARY beyond a few classes (20 classes: 1.8 s instead of 3.2 s; with 3 the
    conversion would cost more than it saves, 0.57 s against 0.38 s); masks that overlap stay
    stacked for BINARY and are refused for LABELMAP.
    """
    a = np.asarray(masks)
    n = len(classes)
    if a.ndim == 2:
        a = a[np.newaxis]
    if a.ndim == 3:
        if a.dtype.kind not in "biu":
            raise ResultError(f"a label map must hold integers, got {a.dtype}")
        if a.size and (int(a.min()) < 0 or int(a.max()) > n):
            raise ResultError(f"label map values must lie in 0..{n} (the card has {n} classes)")
        _check_grid(a.shape, grid)
        if a.dtype.kind == "b":
            a = a.view(np.uint8)
        # highdicom takes uint8 or uint16 label maps only; the smallest that holds the classes
        # keeps LABELMAP frames at 8 bits where they can be.
        return np.ascontiguousarray(a, dtype=_label_dtype(n))
    if a.ndim != 4:
        raise ResultError(f"masks must be 2-D, 3-D or 4-D, got shape {a.shape}")
    stacked = _stacked_masks(a, classes)
    _check_grid(stacked.shape, grid)
    if not labelmap and n <= _FEW_CLASSES:
        return stacked  # _Segmentation's hook decides SegmentsOverlap
    count = _class_count(stacked)
    if count.max(initial=0) <= 1:
        # Each pixel is in at most one class: the sum of class numbers is its label.
        u = stacked.view(np.uint8)
        numbers = np.arange(1, n + 1, dtype=np.uint16)
        labels = np.einsum("...k,k->...", u, numbers, dtype=np.uint16, casting="unsafe")
        return labels.astype(_label_dtype(n), copy=False)
    if labelmap:
        plane, row, col = np.unravel_index(int(np.argmax(count > 1)), count.shape)
        both = [classes[k].label for k in np.flatnonzero(stacked[plane, row, col])]
        raise ResultError(
            f"LABELMAP needs mutually exclusive classes, but the masks overlap: pixel (plane {plane}, "
            f"row {row}, column {col}) is in {', '.join(map(repr, both))}; use BINARY for this model"
        )
    return stacked


def _label_dtype(classes: int) -> type:
    if classes > 65535:
        raise ResultError(f"a SEG holds at most 65535 segments, the card has {classes} classes")
    return np.uint8 if classes <= 255 else np.uint16


def _check_grid(shape: tuple[int, ...], grid: tuple[int, int, int]) -> None:
    if tuple(shape[:3]) != grid:
        raise ResultError(f"mask grid {tuple(shape[:3])} does not match the source (planes, rows, cols) {grid}")


def _stacked_masks(a: np.ndarray, classes: Sequence[OutputClass]) -> np.ndarray:
    """A ``[planes, rows, cols, classes]`` stack as bool, probabilities thresholded per class."""
    n = len(classes)
    if a.shape[-1] != n:
        raise ResultError(f"masks have {a.shape[-1]} classes on the last axis, the card has {n}")
    if a.dtype.kind == "f":
        if not np.isfinite(a).all():
            raise ResultError("probability masks contain NaN or infinity")
        stacked = a >= np.array([c.threshold for c in classes], dtype=a.dtype)
    elif a.dtype.kind == "b":
        stacked = a
    elif a.dtype.kind in "iu":
        if a.size and (int(a.min()) < 0 or int(a.max()) > 1):
            raise ResultError("stacked integer masks must be binary (0/1)")
        stacked = a.astype(bool)
    else:
        raise ResultError(f"unsupported mask dtype {a.dtype}")
    return np.ascontiguousarray(stacked, dtype=bool)


# --------------------------------------------------------------------------- classification SR


def build_classification_sr(
    source_images: Sequence[Dataset],
    probabilities: Mapping[str, float] | Sequence[float] | np.ndarray,
    card: ModelCard,
    model_uid: str,
    *,
    station_name: str = DEFAULT_STATION_NAME,
    series_number: int | None = None,
    content_datetime: _dt.datetime | None = None,
    top_k: int | None = None,
) -> hd.sr.Comprehensive3DSR:
    """A TID 1500 Comprehensive 3D SR of a classifier's output on ``source_images``.

    ``probabilities``: per class, either a mapping ``label -> p`` covering every card class or a
    sequence in card order; values in [0, 1] (apply the card's activation first). One
    measurement group per class, most probable first, ``top_k`` of them if given. The decision
    ("Presence of property") is the argmax for softmax heads and ``p >= threshold`` for
    sigmoid heads, which may mark several classes present.
    """
    if card.task.type != "classification":
        raise ResultError(f"model {card.identity.name!r} is a {card.task.type} model, not classification")
    if top_k is not None and top_k < 1:
        raise ResultError("top_k must be at least 1")
    metas = _source_metadata(source_images)
    probs = _probabilities(probabilities, card.task.classes)
    present = _decisions(probs, card)

    first = metas[0]
    series_uid, instance_uid = result_uids(first.SeriesInstanceUID, model_uid, "SR")
    when = content_datetime or _dt.datetime.now()
    ident = card.identity

    algorithm = hd.sr.AlgorithmIdentification(
        name=ident.name,
        version=ident.version,
        parameters=[f"model_uid={model_uid}"],
        family=AI_FAMILY,
        manufacturer=ident.manufacturer,
    )
    sites = [hd.sr.FindingSite(_sr_code(a)) for a in card.target.anatomy]
    # Stable sort: ties keep card order, so the same probabilities give the same document.
    order = sorted(range(len(probs)), key=lambda i: -probs[i])
    if top_k is not None:
        order = order[:top_k]

    def groups(with_sources: bool) -> list[hd.sr.MeasurementsAndQualitativeEvaluations]:
        refs = (
            [hd.sr.SourceImageForMeasurementGroup.from_source_image(m) for m in metas]
            if with_sources
            else None
        )
        out = []
        for i in order:
            cls = card.task.classes[i]
            out.append(
                hd.sr.MeasurementsAndQualitativeEvaluations(
                    tracking_identifier=hd.sr.TrackingIdentifier(
                        uid=derived_uid(_UID_NAMESPACE, "tracking", instance_uid, cls.label),
                        identifier=cls.label,
                    ),
                    finding_category=_sr_code(cls.category),
                    finding_type=_sr_code(cls.type),
                    finding_sites=None if cls.category.value in _ANATOMY_CATEGORIES else sites,
                    algorithm_id=algorithm,
                    qualitative_evaluations=[
                        hd.sr.QualitativeEvaluation(PRESENCE, PRESENT if present[i] else ABSENT)
                    ],
                    measurements=[
                        hd.sr.Measurement(
                            name=CERTAINTY_OF_FINDING, value=float(probs[i] * 100.0), unit=PERCENT
                        )
                    ],
                    source_images=refs,
                )
            )
        return out

    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=model_uid,
            name=ident.name,
            manufacturer_name=ident.manufacturer,
            model_name=f"{ident.name} {ident.version}",
        ),
    )
    context = hd.sr.ObservationContext(observer_device_context=observer)
    try:
        # A group without source images refers to every image of the document (highdicom's
        # reading of TID 1501), so a long series is listed once, in the library: highdicom's SR
        # build time grows with the item count (200 slices x 4 classes: 7.4 s with per-group
        # lists, 4.7 s without; see docs/results.md).
        report = hd.sr.MeasurementReport(
            observation_context=context,
            procedure_reported=PROCEDURE_REPORTED,
            imaging_measurements=groups(len(metas) <= GROUP_SOURCE_LIMIT),
            referenced_images=metas,
        )
    except (AttributeError, IndexError, TypeError, ValueError) as exc:
        # highdicom's Image Library entry reads descriptors (PatientOrientation,
        # ImagerPixelSpacing, SliceThickness) that real images may leave empty. The library is
        # a convenience for viewers; every group then lists its source images itself and the
        # evidence sequence names every instance, so drop the library instead of failing.
        log.warning("SR without Image Library: source descriptors incomplete (%s)", exc)
        report = hd.sr.MeasurementReport(
            observation_context=context,
            procedure_reported=PROCEDURE_REPORTED,
            imaging_measurements=groups(True),
        )

    return hd.sr.Comprehensive3DSR(
        evidence=metas,
        content=report[0],
        series_instance_uid=series_uid,
        series_number=series_number if series_number is not None else result_series_number(first, "SR"),
        sop_instance_uid=instance_uid,
        instance_number=1,
        manufacturer=NODE_MANUFACTURER,
        # An automated, unverified result: complete, but preliminary until a reader confirms it.
        is_complete=True,
        is_final=False,
        is_verified=False,
        contributing_equipment=contributing_equipment(
            card, model_uid, station_name=station_name, when=when
        ),
        series_description=result_series_description(card),
        manufacturer_model_name=NODE_MODEL_NAME,
        software_versions=node_software_version(),
        device_serial_number=_lo(station_name),
        content_date=when.date(),
        content_time=when.time(),
    )


def _probabilities(
    probabilities: Mapping[str, float] | Sequence[float] | np.ndarray,
    classes: Sequence[OutputClass],
) -> list[float]:
    labels = [c.label for c in classes]
    if isinstance(probabilities, Mapping):
        missing = [lb for lb in labels if lb not in probabilities]
        extra = sorted(set(probabilities) - set(labels))
        if missing or extra:
            raise ResultError(f"probabilities must cover the card's classes: missing {missing}, unknown {extra}")
        values = [probabilities[lb] for lb in labels]
    else:
        values = list(np.asarray(probabilities, dtype=np.float64).reshape(-1))
        if len(values) != len(labels):
            raise ResultError(f"got {len(values)} probabilities for {len(labels)} classes")
    out = []
    for label, v in zip(labels, values, strict=True):
        p = float(v)
        if not math.isfinite(p) or p < -1e-6 or p > 1 + 1e-6:
            raise ResultError(f"probability of {label!r} must lie in [0, 1], got {p}")
        out.append(min(max(p, 0.0), 1.0))
    return out


def _decisions(probs: Sequence[float], card: ModelCard) -> list[bool]:
    if card.task.activation == "sigmoid":
        return [p >= c.threshold for p, c in zip(probs, card.task.classes, strict=True)]
    top = max(range(len(probs)), key=lambda i: probs[i])  # first of ties, like numpy argmax
    return [i == top for i in range(len(probs))]


# --------------------------------------------------------------------------- shared helpers


def _source_metadata(source_images: Iterable[Dataset]) -> list[Dataset]:
    """Pixel-free copies of the sources with missing type 2 patient/study attributes present.

    highdicom needs only metadata; copying without pixel data keeps memory flat for big series
    and lets us fill absent type 2 attributes without touching the caller's datasets.
    """
    metas = []
    for ds in source_images:
        meta = Dataset()
        # Elements are carried over as read (get_item leaves them raw): converting every value of
        # a 200-slice series only to copy it cost a fifth of a second per SEG.
        for tag in ds.keys():
            if tag not in _PIXEL_TAGS:
                meta[tag] = ds.get_item(tag)
        if hasattr(ds, "file_meta"):
            meta.file_meta = ds.file_meta
        for keyword in _TYPE2_COPIED:
            if keyword not in meta:
                setattr(meta, keyword, None)
        if "FrameOfReferenceUID" not in meta and not _positive_spacing(meta.get("PixelSpacing")):
            # Projection radiographs often carry PixelSpacing 0/0 (unknown); highdicom would
            # copy it into the SEG's Pixel Measures, which dciodvfy rejects and highdicom cannot
            # read back. Unknown spacing is better said by leaving Pixel Measures out.
            if "PixelSpacing" in meta:
                del meta.PixelSpacing
        metas.append(meta)
    if not metas:
        raise ResultError("at least one source image is required")
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID"):
        if any(keyword not in m for m in metas):
            raise ResultError(f"every source image needs {keyword}")
    return metas


def _positive_spacing(value: object) -> bool:
    try:
        return len(value) == 2 and all(float(v) > 0 for v in value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False


def _sr_code(code: Code) -> SRCode:
    return SRCode(value=code.value, scheme_designator=code.scheme, meaning=code.meaning)


def _lo(text: str) -> str:
    """A valid LO value: no backslash (the VM delimiter), no control characters, <= 64 chars."""
    return re.sub(r"[\x00-\x1f\\]", " ", str(text)).strip()[:64]


def _sh(text: str) -> str:
    return _lo(text)[:16]


def _st(text: str) -> str:
    return re.sub(r"[\x00-\x08\x0b\x0c\x0e-\x1f]", " ", str(text))[:1024]


def _content_label(name: str) -> str:
    """ContentLabel is a CS (upper case, digits, space, underscore; 16 chars)."""
    # Cut, then strip: a cut can end on an underscore, which a CS may not end with.
    label = re.sub(r"[^A-Z0-9_]", "_", name.upper())[:16].strip("_")
    return label or "AI_RESULT"


UNVERIFIED_PREFIX = "UNVERIFIED"
COMMENT = SRCode(value="121106", scheme_designator="DCM", meaning="Comment")


def mark_unverified(ds: Dataset, text: str) -> Dataset:
    """Mark a SEG or SR built above as unverified, where a radiologist sees it.

    The node ran a model although the images and the header disagree on the body part
    (``selection.on_contradiction = "mark"``): SeriesDescription starts with ``UNVERIFIED``
    (the line a PACS lists the series by), a SEG's ContentDescription holds ``text``, and an SR
    gets ``text`` as a Comment (DCM 121106) TEXT item in its root container, read out by every
    SR viewer. Changes ``ds`` in place and returns it.
    """
    text = _st(text).strip() or "UNVERIFIED: image and header disagree"
    ds.SeriesDescription = _lo(f"{UNVERIFIED_PREFIX} {ds.get('SeriesDescription', '') or ''}")
    modality = str(ds.get("Modality", ""))
    if modality == "SEG":
        ds.ContentDescription = _lo(text)
    elif modality == "SR":
        item = hd.sr.TextContentItem(name=COMMENT, value=text, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)
        ds.ContentSequence.append(item)
    else:
        raise ValueError(f"mark_unverified: Modality {modality!r} is neither SEG nor SR")
    return ds

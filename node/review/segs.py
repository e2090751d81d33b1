"""Segmentations read back into masks per source image and segment type, and compared.

A BINARY or FRACTIONAL SEG is one frame per (segment, source image); a LABELMAP SEG one frame
per source image whose values are segment numbers. Frames name their source image in
DerivationImageSequence (highdicom, dcmqi, 3D Slicer and OHIF all write it); a frame that does
not is a geometry the node cannot check, and the correction is refused.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset


class SegmentationError(ValueError):
    """Why a segmentation cannot be used (the text goes into the log and the verdict's reason)."""


@dataclass(frozen=True)
class SegmentType:
    scheme: str
    value: str
    meaning: str
    label: str = ""  # SegmentLabel: the model's class name in the node's results

    @property
    def key(self) -> str:
        return f"{self.scheme}:{self.value}"


@dataclass
class Masks:
    """``masks[segment key][source SOP Instance UID]`` is a bool [Rows, Columns] array."""

    rows: int
    columns: int
    frame_of_reference: str
    types: dict[str, SegmentType]
    masks: dict[str, dict[str, np.ndarray]]
    manual: bool  # drawn or edited by a person (MANUAL or SEMIAUTOMATIC), not an AI result


def _segment_types(ds: Dataset) -> tuple[dict[int, SegmentType], bool]:
    types: dict[int, SegmentType] = {}
    manual = False
    for item in ds.get("SegmentSequence", []):
        code = item.SegmentedPropertyTypeCodeSequence[0]
        types[int(item.SegmentNumber)] = SegmentType(str(code.CodingSchemeDesignator), str(code.CodeValue),
                                                     str(code.CodeMeaning), str(item.get("SegmentLabel", "")))
        manual |= str(item.get("SegmentAlgorithmType", "")) in ("MANUAL", "SEMIAUTOMATIC")
    if not types:
        raise SegmentationError("the SEG has no SegmentSequence")
    return types, manual


def is_manual(ds: Dataset) -> bool:
    """True for a SEG that a person made or edited (any segment MANUAL or SEMIAUTOMATIC)."""
    try:
        return _segment_types(ds)[1]
    except (SegmentationError, AttributeError, IndexError, KeyError):
        return False


def _frame_source(item: Dataset) -> str:
    try:
        return str(item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)
    except (AttributeError, IndexError):
        raise SegmentationError("a frame does not name its source image (DerivationImageSequence)") from None


def read_masks(ds: Dataset) -> Masks:
    """Every segment's mask per source image; raises :class:`SegmentationError` with the reason."""
    types, manual = _segment_types(ds)
    rows, columns = int(ds.Rows), int(ds.Columns)
    pixels = ds.pixel_array
    if pixels.ndim == 2:
        pixels = pixels[None]
    frames = ds.get("PerFrameFunctionalGroupsSequence", [])
    if len(frames) != pixels.shape[0]:
        raise SegmentationError(f"{pixels.shape[0]} frames but {len(frames)} per-frame functional groups")
    labelmap = str(ds.get("SegmentationType", "")) == "LABELMAP"
    threshold = 0 if str(ds.get("SegmentationType", "")) == "BINARY" or labelmap else \
        int(ds.get("MaximumFractionalValue", 255)) // 2
    masks: dict[str, dict[str, np.ndarray]] = {t.key: {} for t in types.values()}
    for frame, item in zip(pixels, frames, strict=True):
        source = _frame_source(item)
        if labelmap:
            for number, t in types.items():
                masks[t.key][source] = masks[t.key].get(source, False) | (frame == number)
            continue
        try:
            number = int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        except (AttributeError, IndexError):
            raise SegmentationError("a frame does not name its segment") from None
        if number not in types:
            raise SegmentationError(f"a frame names segment {number}, which the SEG does not define")
        key = types[number].key
        masks[key][source] = masks[key].get(source, False) | (frame > threshold)
    return Masks(rows, columns, str(ds.get("FrameOfReferenceUID", "")), {t.key: t for t in types.values()},
                 masks, manual)


def dice(a: dict[str, np.ndarray], b: dict[str, np.ndarray], sources: list[str], shape: tuple[int, int]) -> float:
    """Dice over the whole series (``sources``); an image absent from a SEG is empty in it."""
    empty = np.zeros(shape, bool)
    inter = total = 0
    for uid in sources:
        x, y = a.get(uid, empty), b.get(uid, empty)
        inter += int(np.count_nonzero(x & y))
        total += int(np.count_nonzero(x)) + int(np.count_nonzero(y))
    return 1.0 if total == 0 else 2.0 * inter / total

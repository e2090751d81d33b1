"""From the instances of a series to an array a model can read.

Slices are ordered by their position along the slice normal (the cross product of the two
direction cosines in ImageOrientationPatient), not by InstanceNumber, which scanners number in
acquisition order, sometimes feet-first and sometimes restarting. Pixel data are decoded by
pydicom with its pylibjpeg plugins, so JPEG, JPEG-LS, JPEG 2000 and RLE series load like
uncompressed ones. Rescale slope and intercept are applied here (modality LUT), so CT arrives in
Hounsfield units; windowing and normalisation follow the model card in ``models.preprocess``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset


class VolumeError(ValueError):
    """The series cannot be assembled into one array (mixed sizes, no pixels, ...)."""


@dataclass
class Volume:
    pixels: np.ndarray  # float32 [slices, rows, columns] (or [slices, rows, columns, samples])
    datasets: list[Dataset]  # one per slice, in the order of ``pixels`` (frames repeat their dataset)
    frame_numbers: list[int]  # 1-based frame number within each dataset
    spacing: tuple[float, float, float]  # (between slices, row, column) in mm; 1.0 where unknown
    photometric: str
    # LPS unit vector of each array axis (rows: slice, row, column); None without geometry.
    directions: np.ndarray | None = None
    has_spacing: bool = False  # PixelSpacing was given (else the 1.0 above are placeholders)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.pixels.shape

    @property
    def sources(self) -> list[Dataset]:
        """The distinct instances, in slice order (one for a multi-frame image)."""
        seen: dict[int, Dataset] = {}
        for ds in self.datasets:
            seen.setdefault(id(ds), ds)
        return list(seen.values())


@dataclass
class _Plane:
    ds: Dataset
    frame: int  # 0-based
    orientation: np.ndarray | None  # 6 direction cosines
    position: np.ndarray | None
    spacing: tuple[float, float] | None  # (row, column) mm
    thickness: float
    slope: float
    intercept: float


def _functional(ds: Dataset, frame: int, sequence: str, keyword: str) -> object:
    """An attribute of an enhanced multi-frame image's frame: per-frame group first, then the
    shared one (PS3.3 C.7.6.16)."""
    for groups, index in (("PerFrameFunctionalGroupsSequence", frame), ("SharedFunctionalGroupsSequence", 0)):
        items = ds.get(groups)
        if items is None or len(items) <= index:
            continue
        inner = items[index].get(sequence)
        if inner and keyword in inner[0]:
            return inner[0].get(keyword)
    return None


def _planes(ds: Dataset) -> list[_Plane]:
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    enhanced = "PerFrameFunctionalGroupsSequence" in ds or "SharedFunctionalGroupsSequence" in ds
    out = []
    for f in range(frames):
        if enhanced:
            iop = _functional(ds, f, "PlaneOrientationSequence", "ImageOrientationPatient")
            ipp = _functional(ds, f, "PlanePositionSequence", "ImagePositionPatient")
            spacing = _functional(ds, f, "PixelMeasuresSequence", "PixelSpacing")
            thickness = _functional(ds, f, "PixelMeasuresSequence", "SliceThickness")
            slope = _functional(ds, f, "PixelValueTransformationSequence", "RescaleSlope")
            intercept = _functional(ds, f, "PixelValueTransformationSequence", "RescaleIntercept")
        else:
            iop = ds.get("ImageOrientationPatient")
            ipp = ds.get("ImagePositionPatient") if frames == 1 else None
            spacing = ds.get("PixelSpacing") or ds.get("ImagerPixelSpacing")
            thickness = ds.get("SpacingBetweenSlices") or ds.get("SliceThickness")
            slope, intercept = None, None
        slope = slope if slope is not None else ds.get("RescaleSlope", 1)
        intercept = intercept if intercept is not None else ds.get("RescaleIntercept", 0)
        out.append(_Plane(
            ds=ds, frame=f,
            orientation=np.asarray(iop, float) if iop is not None and len(iop) == 6 else None,
            position=np.asarray(ipp, float) if ipp is not None and len(ipp) == 3 else None,
            spacing=(float(spacing[0]), float(spacing[1])) if spacing and len(spacing) == 2 else None,
            thickness=float(thickness or 0) or 0.0,
            slope=float(slope or 1), intercept=float(intercept or 0),
        ))
    return out


def slice_normal(ds: Dataset) -> np.ndarray | None:
    iop = ds.get("ImageOrientationPatient")
    if iop is None or len(iop) != 6:
        return None
    row, col = np.asarray(iop[:3], float), np.asarray(iop[3:], float)
    n = np.cross(row, col)
    norm = np.linalg.norm(n)
    return n / norm if norm > 0 else None


def sort_slices(datasets: Sequence[Dataset]) -> list[Dataset]:
    """Order slices along the normal; fall back to InstanceNumber when geometry is missing."""
    normal = slice_normal(datasets[0]) if datasets else None
    if normal is not None and all("ImagePositionPatient" in ds for ds in datasets):
        return sorted(datasets, key=lambda ds: (float(np.dot(normal, np.asarray(ds.ImagePositionPatient, float))),
                                                int(ds.get("InstanceNumber", 0) or 0), str(ds.SOPInstanceUID)))
    return sorted(datasets, key=lambda ds: (int(ds.get("InstanceNumber", 0) or 0), str(ds.get("SOPInstanceUID", ""))))


def _modality_lut(slope: float, intercept: float, arr: np.ndarray, out: np.ndarray) -> None:
    """``out[...] = arr * slope + intercept`` in float32, written in place (no temporaries: a
    200-slice CT is 200 MiB of float32, and each extra pass over it shows in the latency)."""
    out[...] = arr
    if slope != 1.0:
        out *= np.float32(slope)
    if intercept != 0.0:
        out += np.float32(intercept)


def has_slice_geometry(datasets: Sequence[Dataset]) -> bool:
    """Every plane (slice or frame) has a position and an orientation, and there are several."""
    planes = [p for ds in datasets for p in _planes(ds)]
    return len(planes) > 1 and all(p.position is not None and p.orientation is not None for p in planes)


def _normal(iop: np.ndarray) -> np.ndarray | None:
    n = np.cross(iop[:3], iop[3:])
    norm = np.linalg.norm(n)
    return n / norm if norm > 0 else None


def load_volume(datasets: Sequence[Dataset], *, rescale: bool = True) -> Volume:
    """Decode, rescale and stack the planes of one series, in patient order.

    Planes are the slices of a single-frame series or the frames of multi-frame instances
    (enhanced CT/MR: geometry and rescale per frame from the functional groups). With geometry
    they are sorted along the slice normal; otherwise by InstanceNumber, frames in order.
    """
    if not datasets:
        raise VolumeError("no instances")
    with_pixels = [ds for ds in datasets if "PixelData" in ds]
    if not with_pixels:
        raise VolumeError("no instance of the series carries pixel data")
    planes = [p for ds in sort_slices(with_pixels) for p in _planes(ds)]
    first = planes[0]
    normal = _normal(first.orientation) if first.orientation is not None else None
    located = normal is not None and all(p.position is not None for p in planes)
    if located:
        planes.sort(key=lambda p: (float(np.dot(normal, p.position)), int(p.ds.get("InstanceNumber", 0) or 0),
                                   str(p.ds.get("SOPInstanceUID", "")), p.frame))
    decoded: dict[int, np.ndarray] = {}
    shape = None
    for ds in with_pixels:
        try:
            arr = ds.pixel_array
        except Exception as exc:  # pydicom raises several types for undecodable pixel data
            raise VolumeError(f"cannot decode pixel data of {ds.get('SOPInstanceUID', '?')} "
                              f"({ds.file_meta.TransferSyntaxUID.name if 'file_meta' in ds else '?'}): {exc}") from exc
        if int(ds.get("NumberOfFrames", 1) or 1) == 1:
            arr = arr[np.newaxis]
        if shape is None:
            shape = arr.shape[1:]
        elif arr.shape[1:] != shape:
            raise VolumeError(f"slices differ in size: {arr.shape[1:]} vs {shape}")
        decoded[id(ds)] = arr
    pixels = np.empty((len(planes), *shape), np.float32)
    for i, p in enumerate(planes):
        src = decoded[id(p.ds)][p.frame]
        if rescale and int(p.ds.get("SamplesPerPixel", 1) or 1) == 1:
            _modality_lut(p.slope, p.intercept, src, pixels[i])
        else:
            pixels[i] = src
    spacing_rc = first.spacing or (1.0, 1.0)
    between = first.thickness or 1.0
    directions = None
    if located:
        positions = [float(np.dot(normal, p.position)) for p in planes]
        gaps = np.diff(positions)
        if len(gaps) and np.all(gaps > 0):
            between = float(np.median(gaps))
        directions = np.stack([normal, first.orientation[3:], first.orientation[:3]])
    return Volume(pixels=pixels, datasets=[p.ds for p in planes], frame_numbers=[p.frame + 1 for p in planes],
                  spacing=(between, float(spacing_rc[0]), float(spacing_rc[1])),
                  photometric=str(with_pixels[0].get("PhotometricInterpretation", "")),
                  directions=directions, has_spacing=first.spacing is not None)

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

    @property
    def shape(self) -> tuple[int, ...]:
        return self.pixels.shape


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


def _modality_lut(ds: Dataset, arr: np.ndarray, out: np.ndarray) -> None:
    """``out[...] = arr * slope + intercept`` in float32, written in place (no temporaries: a
    200-slice CT is 200 MiB of float32, and each extra pass over it shows in the latency)."""
    slope = float(ds.get("RescaleSlope", 1) or 1)
    intercept = float(ds.get("RescaleIntercept", 0) or 0)
    out[...] = arr
    if slope != 1.0:
        out *= np.float32(slope)
    if intercept != 0.0:
        out += np.float32(intercept)


def load_volume(datasets: Sequence[Dataset], *, rescale: bool = True) -> Volume:
    """Decode, rescale and stack the slices of one series (multi-frame instances are unrolled)."""
    if not datasets:
        raise VolumeError("no instances")
    ordered = sort_slices([ds for ds in datasets if "PixelData" in ds])
    if not ordered:
        raise VolumeError("no instance of the series carries pixel data")
    decoded: list[tuple[Dataset, np.ndarray, int]] = []
    owners: list[Dataset] = []
    frames: list[int] = []
    shape = None
    for ds in ordered:
        try:
            arr = ds.pixel_array
        except Exception as exc:  # pydicom raises several types for undecodable pixel data
            raise VolumeError(f"cannot decode pixel data of {ds.get('SOPInstanceUID', '?')} "
                              f"({ds.file_meta.TransferSyntaxUID.name if 'file_meta' in ds else '?'}): {exc}") from exc
        n_frames = int(ds.get("NumberOfFrames", 1) or 1)
        spp = int(ds.get("SamplesPerPixel", 1) or 1)
        if n_frames == 1:
            arr = arr[np.newaxis]
        if shape is None:
            shape = arr.shape[1:]
        elif arr.shape[1:] != shape:
            raise VolumeError(f"slices differ in size: {arr.shape[1:]} vs {shape}")
        decoded.append((ds, arr, spp))
        for f in range(n_frames):
            owners.append(ds)
            frames.append(f + 1)
    pixels = np.empty((len(owners), *shape), np.float32)
    at = 0
    for ds, arr, spp in decoded:
        target = pixels[at:at + len(arr)]
        if rescale and spp == 1:
            _modality_lut(ds, arr, target)
        else:
            target[...] = arr
        at += len(arr)
    first = ordered[0]
    spacing_rc = first.get("PixelSpacing") or first.get("ImagerPixelSpacing") or [1.0, 1.0]
    between = float(first.get("SpacingBetweenSlices", 0) or first.get("SliceThickness", 0) or 1.0)
    normal = slice_normal(first)
    if normal is not None and len(ordered) > 1 and "ImagePositionPatient" in ordered[1]:
        positions = [float(np.dot(normal, np.asarray(ds.ImagePositionPatient, float))) for ds in ordered]
        gaps = np.diff(positions)
        if len(gaps) and np.all(gaps > 0):
            between = float(np.median(gaps))
    return Volume(pixels=pixels, datasets=owners, frame_numbers=frames,
                  spacing=(between, float(spacing_rc[0]), float(spacing_rc[1])),
                  photometric=str(first.get("PhotometricInterpretation", "")))

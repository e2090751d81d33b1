"""A job's result as pictures: the source series with the SEG over it, one PNG per slice or a montage.

Pure rendering (numpy and Pillow, no web imports): the console serves :func:`slice_png` at
``/jobs/N/slice/K.png`` and ``modelnode jobs show N --png out.png`` writes :func:`montage_png`.

The source images and the result objects are read from the object store through the index (a
UID is only ever a key in the index, never part of a path). Segment colours are the SEG's own
RecommendedDisplayCIELabValue, the colour every DICOM viewer shows the segment in. Window/level
presets are in Hounsfield units and apply to CT; other modalities get the window in their
header, or the 1st-99th percentile of their pixels.

A decoded job is kept in a small LRU cache (:class:`ResultCache`): decoding a 24-slice CT and
its SEG takes about 0.2 s here, rendering one slice from the cache a few milliseconds
(scripts/bench_console), so scrolling pays the decode once.
"""

from __future__ import annotations

import io
import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import pydicom
from PIL import Image, ImageDraw
from pydicom.dataset import Dataset

from models.volume import sort_slices
from node.pipeline.jobs import Job
from node.review import segs
from node.storage import index
from node.storage.objects import ObjectStore

SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"

# (center, width) in HU. "auto": the series' own window, else the 1st-99th percentile.
WINDOWS: dict[str, tuple[float, float] | None] = {
    "auto": None,
    "lung": (-600.0, 1500.0),
    "soft": (40.0, 400.0),
    "bone": (400.0, 1800.0),
    "brain": (40.0, 80.0),
}
# The colours for segments whose SEG names none (iods.results writes one for every segment).
FALLBACK_COLOURS = ((230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240))
ALPHA = 0.45  # fill opacity: the tissue under the mask stays readable; the outline is opaque


class RenderError(ValueError):
    """The request cannot be drawn: the text says why (shown to the user, or the CLI's message)."""


class NothingToShow(LookupError):
    """The job has no images to show (not run yet, or its series is gone)."""


@dataclass(frozen=True)
class Segment:
    number: int
    label: str
    meaning: str
    rgb: tuple[int, int, int]

    @property
    def hex(self) -> str:
        r, g, b = self.rgb
        return f"#{r:02x}{g:02x}{b:02x}"


@dataclass
class ResultImages:
    """A job's source series in slice order with its segment masks and its SR findings."""

    job_id: int
    series_uid: str
    modality: str
    pixels: np.ndarray  # float32 [z, y, x], modality values (HU for CT)
    uids: list[str]  # source SOP Instance UID of each slice
    monochrome1: bool
    header_window: tuple[float, float] | None
    segments: list[Segment] = field(default_factory=list)
    masks: dict[int, np.ndarray] = field(default_factory=dict)  # segment number -> bool [z, y, x]
    findings: list[tuple[int, str, str]] = field(default_factory=list)  # (depth, name, value) from SRs
    result_uids: list[str] = field(default_factory=list)

    @property
    def slices(self) -> int:
        return int(self.pixels.shape[0])

    def slices_with_mask(self) -> list[int]:
        if not self.masks:
            return []
        any_mask = np.zeros(self.slices, bool)
        for m in self.masks.values():
            any_mask |= m.reshape(self.slices, -1).any(axis=1)
        return [int(k) for k in np.flatnonzero(any_mask)]

    def default_slice(self) -> int:
        """The middle of the masked slices (the middle of the series when nothing is masked)."""
        masked = self.slices_with_mask()
        return masked[len(masked) // 2] if masked else self.slices // 2

    def default_window(self) -> str:
        return "lung" if self.modality == "CT" and any("lung" in s.label.lower() for s in self.segments) else (
            "soft" if self.modality == "CT" else "auto")


# --------------------------------------------------------------------------- reading


def _instances_of(series_uid: str) -> list[index.Instance]:
    # Not filtered on has_pixels: the streaming Storage SCP indexes without parsing pixel data.
    return list(index.Instance.select().join(index.Series).where(index.Series.series_uid == series_uid))


def _instance(sop_uid: str) -> index.Instance | None:
    return index.Instance.get_or_none(index.Instance.sop_uid == sop_uid)


def _colour(item: Dataset, number: int) -> tuple[int, int, int]:
    value = item.get("RecommendedDisplayCIELabValue")
    if value is not None and len(value) == 3:
        import highdicom as hd

        try:
            return tuple(int(c) for c in hd.color.CIELabColor.from_dicom_value([int(v) for v in value]).to_rgb(clip=True))
        except (ValueError, TypeError):
            pass
    return FALLBACK_COLOURS[(number - 1) % len(FALLBACK_COLOURS)]


def _findings(ds: Dataset, depth: int = 0, out: list[tuple[int, str, str]] | None = None) -> list[tuple[int, str, str]]:
    """The SR's content tree flattened to (depth, concept name, value) lines."""
    out = [] if out is None else out
    for item in ds.get("ContentSequence", []):
        if len(out) >= 80 or depth > 6:
            break
        name = item.ConceptNameCodeSequence[0].CodeMeaning if item.get("ConceptNameCodeSequence") else ""
        vt = str(item.get("ValueType", ""))
        value = ""
        if vt == "TEXT":
            value = str(item.get("TextValue", ""))
        elif vt == "CODE" and item.get("ConceptCodeSequence"):
            value = str(item.ConceptCodeSequence[0].CodeMeaning)
        elif vt == "NUM" and item.get("MeasuredValueSequence"):
            mv = item.MeasuredValueSequence[0]
            unit = mv.MeasurementUnitsCodeSequence[0].CodeValue if mv.get("MeasurementUnitsCodeSequence") else ""
            value = f"{float(mv.NumericValue):g} {unit if unit not in ('1', '{ratio}') else ''}".strip()
        elif vt in ("UIDREF", "DATETIME", "DATE", "TIME", "PNAME"):
            value = str(item.get({"UIDREF": "UID", "DATETIME": "DateTime", "DATE": "Date", "TIME": "Time",
                                  "PNAME": "PersonName"}[vt], ""))
        if str(name) in _SR_CONTEXT or str(name).startswith(("Device Observer", "Algorithm ")):
            continue  # who and what made the report, the same in every group: not a finding
        if vt != "IMAGE":
            out.append((depth, str(name), value))
        _findings(item, depth + 1, out)
    return out


# Report context rather than findings (TID 1500's header, image library, algorithm identification).
_SR_CONTEXT = frozenset({"Language of Content Item and Descendants", "Observer Type", "Procedure reported",
                         "Image Library", "Tracking Unique Identifier", "Finding category"})


def _source_series(job: Job, seg: Dataset | None) -> str:
    if seg is not None and seg.get("ReferencedSeriesSequence"):
        return str(seg.ReferencedSeriesSequence[0].SeriesInstanceUID)
    if job.group_by == "series":
        return job.group_key
    # A study job whose results name no series: its first image series.
    series = (index.Series.select().join(index.Study)
              .where((index.Study.study_uid == job.group_key) & (index.Series.is_model == False))  # noqa: E712
              .order_by(index.Series.id).first())
    return series.series_uid if series is not None else ""


def load_result(store: ObjectStore, job: Job) -> ResultImages:
    """Read a job's source series, its SEG's masks and its SRs' findings (needs the database bound)."""
    seg: Dataset | None = None
    srs: list[Dataset] = []
    results = job.result_uids()
    for uid in results:
        row = _instance(uid)
        if row is None:
            continue
        if row.sop_class_uid == SEG_SOP_CLASS and seg is None:
            seg = pydicom.dcmread(store.path(row.digest))
        elif row.sop_class_uid.startswith("1.2.840.10008.5.1.4.1.1.88."):
            srs.append(pydicom.dcmread(store.path(row.digest), stop_before_pixels=True))
    series_uid = _source_series(job, seg)
    rows = _instances_of(series_uid) if series_uid else []
    if not rows:
        raise NothingToShow(f"job {job.id} has no images in the node's store")
    datasets = sort_slices([ds for ds in (pydicom.dcmread(store.path(r.digest)) for r in rows) if "PixelData" in ds])
    if not datasets:
        raise NothingToShow(f"job {job.id}: series {series_uid} has no images")
    frames = []
    for ds in datasets:
        arr = ds.pixel_array.astype(np.float32)
        if arr.ndim == 3 and int(ds.get("SamplesPerPixel", 1)) == 1:
            arr = arr[0]  # a multi-frame image: its first frame (masks are per instance)
        elif arr.ndim == 3:
            arr = arr.mean(axis=-1)
        arr = arr * float(ds.get("RescaleSlope", 1) or 1) + float(ds.get("RescaleIntercept", 0) or 0)
        frames.append(arr)
    shapes = {f.shape for f in frames}
    if len(shapes) != 1:
        raise RenderError(f"series {series_uid}: slices of different sizes {sorted(shapes)}")
    first = datasets[0]
    header_window = None
    if "WindowCenter" in first and "WindowWidth" in first:
        center, width = first.WindowCenter, first.WindowWidth
        center = center[0] if isinstance(center, pydicom.multival.MultiValue) else center
        width = width[0] if isinstance(width, pydicom.multival.MultiValue) else width
        header_window = (float(center), float(width))
    images = ResultImages(job_id=job.id, series_uid=series_uid, modality=str(first.get("Modality", "")),
                          pixels=np.stack(frames), uids=[str(ds.SOPInstanceUID) for ds in datasets],
                          monochrome1=str(first.get("PhotometricInterpretation", "")) == "MONOCHROME1",
                          header_window=header_window, result_uids=results)
    if seg is not None:
        read = segs.read_masks(seg)
        position = {uid: k for k, uid in enumerate(images.uids)}
        for item in seg.SegmentSequence:
            number = int(item.SegmentNumber)
            code = item.SegmentedPropertyTypeCodeSequence[0]
            key = f"{code.CodingSchemeDesignator}:{code.CodeValue}"
            images.segments.append(Segment(number, str(item.get("SegmentLabel", "")), str(code.CodeMeaning),
                                           _colour(item, number)))
            mask = np.zeros(images.pixels.shape, bool)
            for uid, plane in read.masks.get(key, {}).items():
                if uid in position and plane.shape == mask.shape[1:]:
                    mask[position[uid]] |= plane
            images.masks[number] = mask
    for sr in srs:
        images.findings.extend(_findings(sr))
    return images


class ResultCache:
    """The last few decoded jobs, keyed by job id and its results (a retried job draws anew)."""

    def __init__(self, size: int = 3) -> None:
        self.size = size
        self._items: OrderedDict[tuple[int, str], ResultImages] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, store: ObjectStore, job: Job) -> ResultImages:
        key = (job.id, job.results)
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        images = load_result(store, job)  # outside the lock: another job's slice need not wait
        with self._lock:
            self._items[key] = images
            while len(self._items) > self.size:
                self._items.popitem(last=False)
        return images


# --------------------------------------------------------------------------- drawing


def parse_segments(text: str | None, images: ResultImages) -> list[int]:
    """``"1,2"`` -> [1, 2]; None: every segment; "" or "none": no segment."""
    known = {s.number for s in images.segments}
    if text is None:
        return sorted(known)
    if text.strip() in ("", "none"):
        return []
    try:
        wanted = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise RenderError(f"segments must be numbers separated by commas, got {text!r}") from None
    unknown = [n for n in wanted if n not in known]
    if unknown:
        raise RenderError(f"no segment {', '.join(map(str, unknown))} in this result (it has {sorted(known) or 'none'})")
    return wanted


def _window(images: ResultImages, k: int, preset: str) -> tuple[float, float]:
    if preset not in WINDOWS:
        raise RenderError(f"unknown window {preset!r}; known: {', '.join(WINDOWS)}")
    chosen = WINDOWS[preset]
    if chosen is not None:
        return chosen
    if images.header_window is not None:
        return images.header_window
    lo, hi = np.percentile(images.pixels[k], (1, 99))
    return float(lo + hi) / 2, max(float(hi - lo), 1.0)


def _edge(mask: np.ndarray) -> np.ndarray:
    """The mask's own border pixels (inside it), by a 4-neighbour erosion."""
    inner = mask.copy()
    inner[1:, :] &= mask[:-1, :]
    inner[:-1, :] &= mask[1:, :]
    inner[:, 1:] &= mask[:, :-1]
    inner[:, :-1] &= mask[:, 1:]
    return mask & ~inner


def render_slice(images: ResultImages, k: int, *, window: str = "auto", segments: Sequence[int] | None = None) -> np.ndarray:
    """Slice ``k`` as uint8 RGB [y, x, 3] with the chosen segments over it."""
    if not 0 <= k < images.slices:
        raise RenderError(f"slice {k} is outside 0-{images.slices - 1}")
    center, width = _window(images, k, window)
    lo = center - width / 2
    gray = np.clip((images.pixels[k] - lo) * (255.0 / width), 0, 255).astype(np.uint8)
    if images.monochrome1:
        gray = 255 - gray
    rgb = np.repeat(gray[..., None], 3, axis=2)
    chosen = [s for s in images.segments if segments is None or s.number in segments]
    for s in chosen:
        mask = images.masks.get(s.number)
        if mask is None or not mask[k].any():
            continue
        m = mask[k]
        colour = np.asarray(s.rgb, np.float32)
        rgb[m] = (rgb[m] * (1 - ALPHA) + colour * ALPHA).astype(np.uint8)
        rgb[_edge(m)] = s.rgb
    return rgb


def png(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    # compress_level 1: a 256x256 slice in about 2 ms instead of 8 at the default, 10% larger.
    Image.fromarray(rgb, "RGB").save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def slice_png(images: ResultImages, k: int, *, window: str = "auto", segments: Sequence[int] | None = None) -> bytes:
    return png(render_slice(images, k, window=window, segments=segments))


def montage_slices(images: ResultImages, count: int = 12) -> list[int]:
    """Up to ``count`` slices evenly spread over those with a mask (over the series without one)."""
    pool = images.slices_with_mask() or list(range(images.slices))
    if len(pool) <= count:
        return pool
    picks = np.linspace(0, len(pool) - 1, count).round().astype(int)
    return [pool[i] for i in sorted(set(picks.tolist()))]


def montage_png(images: ResultImages, *, window: str | None = None, segments: Sequence[int] | None = None,
                count: int = 12, columns: int = 4, tile: int = 256) -> bytes:
    """A grid of slices with the overlay, each labelled with its slice number (as in the viewer)."""
    window = window or images.default_window()
    chosen: Iterable[int] = montage_slices(images, count)
    tiles = []
    for k in chosen:
        im = Image.fromarray(render_slice(images, k, window=window, segments=segments), "RGB")
        im.thumbnail((tile, tile))
        ImageDraw.Draw(im).text((4, 4), f"{k + 1}/{images.slices}", fill=(255, 255, 0))
        tiles.append(im)
    columns = max(1, min(columns, len(tiles)))
    rows = -(-len(tiles) // columns)
    width = max(t.width for t in tiles)
    height = max(t.height for t in tiles)
    sheet = Image.new("RGB", (columns * width, rows * height), (0, 0, 0))
    for i, t in enumerate(tiles):
        sheet.paste(t, ((i % columns) * width, (i // columns) * height))
    buf = io.BytesIO()
    sheet.save(buf, format="PNG", optimize=False)
    return buf.getvalue()

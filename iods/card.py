"""The model card: a versioned, validated description of what a model is and how to feed it.

A card is written by a person as TOML (``CARD.toml``) and travels inside the model object as
JSON. Both go through :func:`parse_card`, which checks every field and raises
:class:`CardError` naming the first offending field by its dotted path (``task.classes[1].threshold``),
so a publisher can fix a card without reading this module.

The schema is versioned by ``schema`` (``modelnode.card/1``). A card from a newer major
version is refused rather than half-understood.
"""

from __future__ import annotations

import datetime as _dt
import json
import re
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from iods.uids import conformant_uid

SCHEMA = "modelnode.card/1"
SUPPORTED_SCHEMAS = {SCHEMA}

_CS_RE = re.compile(r"^[A-Z0-9 _]{1,16}$")
# DICOM modalities a model may target (PS3.3 C.7.3.1.1.1, those that carry images).
MODALITIES = {
    "CR", "CT", "DX", "MG", "MR", "NM", "OT", "PT", "RF", "RG", "SC", "US", "XA", "IO", "PX",
    "OCT", "OP", "SM", "ES", "XC", "GM",
}
TASKS = {"segmentation", "classification"}
LAYOUTS = {"2d", "3d"}
DTYPES = {"float32", "float16", "uint8", "int16"}
PHOTOMETRICS = {"MONOCHROME1", "MONOCHROME2", "RGB", "YBR_FULL", "YBR_FULL_422", "PALETTE COLOR"}
LATERALITIES = {"L", "R", "B", "U"}
ACTIVATIONS = {"sigmoid", "softmax", "none"}
OUTPUTS = {"probabilities", "logits"}
BLENDINGS = {"gaussian", "constant"}
# nibabel/MONAI axis codes: each letter names the direction an axis *increases* towards.
_AXIS_PAIRS = ("LR", "PA", "IS")


class CardError(ValueError):
    """A model card is invalid. ``field`` is the dotted path of the offending field."""

    def __init__(self, field_path: str, reason: str) -> None:
        self.field = field_path
        self.reason = reason
        super().__init__(f"model card field '{field_path}': {reason}")


@dataclass(frozen=True)
class Code:
    """A coded concept (SNOMED CT unless the scheme says otherwise)."""

    value: str
    meaning: str
    scheme: str = "SCT"

    def key(self) -> str:
        return f"{self.scheme}:{self.value}"


@dataclass(frozen=True)
class Identity:
    name: str
    version: str
    uid: str
    manufacturer: str
    licence: str
    intended_use: str
    created: str  # ISO date
    authors: tuple[str, ...] = ()
    description: str = ""


@dataclass(frozen=True)
class Target:
    modalities: tuple[str, ...]
    body_parts: tuple[str, ...]  # PS3.16 Annex L BodyPartExamined terms
    anatomy: tuple[Code, ...]
    findings: tuple[Code, ...] = ()
    laterality: str = ""


@dataclass(frozen=True)
class OutputClass:
    label: str
    category: Code
    type: Code
    threshold: float = 0.5


@dataclass(frozen=True)
class Task:
    type: str
    classes: tuple[OutputClass, ...]
    # With output "probabilities": what the graph already applied. With "logits": what the
    # node applies (sigmoid per class; softmax over exclusive classes).
    activation: str = "sigmoid"
    output: str = "probabilities"
    # Mutually exclusive classes: the graph has 1 + len(classes) channels, channel 0 is the
    # background (no segment), and each voxel gets the argmax. False: independent classes,
    # one channel each, thresholded (sigmoid).
    exclusive: bool = False

    @property
    def channels(self) -> int:
        """Output channels the graph has."""
        return len(self.classes) + (1 if self.exclusive else 0)


@dataclass(frozen=True)
class Window:
    center: float
    width: float


@dataclass(frozen=True)
class Preprocessing:
    rescale: bool = True  # apply RescaleSlope/Intercept (HU for CT)
    window: Window | None = None
    clip: tuple[float, float] | None = None
    normalize: str = "none"  # none | minmax | zscore | fixed
    mean: float = 0.0
    std: float = 1.0
    resample_size: tuple[int, ...] | None = None
    resample_spacing: tuple[float, ...] | None = None
    invert_monochrome1: bool = True


@dataclass(frozen=True)
class SlidingWindow:
    """Patch-based inference: windows of ``size`` (network axes), ``overlap`` of their size,
    blended with ``blending`` weights (MONAI ``sliding_window_inference`` semantics)."""

    size: tuple[int, ...]
    overlap: float = 0.25
    blending: str = "gaussian"  # gaussian | constant
    sigma_scale: float = 0.125  # Gaussian sigma as a fraction of the window size
    batch: int = 1  # windows per Run()


@dataclass(frozen=True)
class Input:
    layout: str  # "2d" (slice by slice) or "3d" (volume)
    channels: int
    size: tuple[int | None, ...]  # spatial size; None for a dynamic axis
    dtype: str = "float32"
    min_slices: int = 1
    photometric: tuple[str, ...] = ("MONOCHROME2", "MONOCHROME1")
    preprocessing: Preprocessing = field(default_factory=Preprocessing)
    # "" keeps the acquisition grid ([slice, row, column], slices ordered along the normal);
    # else three letters (3d), e.g. "RAS" for NIfTI/MONAI-trained networks, "LPS" for DICOM.
    orientation: str = ""
    # The network's spatial sizes must be multiples of these (pad, run, crop); None: any size.
    size_divisor: tuple[int, ...] | None = None
    sliding_window: SlidingWindow | None = None


@dataclass(frozen=True)
class Provenance:
    training_data: str = ""
    performance: dict[str, float] = field(default_factory=dict)
    parent_uid: str = ""
    training_command: str = ""
    seed: int | None = None
    # The trainable network the graph was exported from, for fine-tuning (docs/finetune.md),
    # e.g. "unet2d:12,24,48,96"; None when none is named (left out of the JSON).
    architecture: str | None = None


@dataclass(frozen=True)
class ModelCard:
    identity: Identity
    target: Target
    task: Task
    input: Input
    provenance: Provenance = field(default_factory=Provenance)
    schema: str = SCHEMA

    def to_dict(self) -> dict[str, Any]:
        return _strip_none(asdict(self))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @property
    def output_count(self) -> int:
        """Output channels of the graph (exclusive classes add the background channel)."""
        return self.task.channels


def _strip_none(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _strip_none(v) for k, v in obj.items() if v is not None}
    if isinstance(obj, (list, tuple)):
        return [_strip_none(v) for v in obj]
    return obj


# --------------------------------------------------------------------------- validation helpers


class _Reader:
    """Reads one mapping of the card, recording the dotted path for error messages."""

    def __init__(self, data: Any, path: str) -> None:
        if not isinstance(data, dict):
            raise CardError(path or "<card>", f"must be a table/object, got {type(data).__name__}")
        self.data = data
        self.path = path
        self._seen: set[str] = set()

    def sub(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def get(self, key: str, default: Any = ..., *, kind: type | tuple[type, ...] | None = None) -> Any:
        self._seen.add(key)
        if key not in self.data or self.data[key] is None:
            if default is ...:
                raise CardError(self.sub(key), "is required")
            return default
        value = self.data[key]
        if kind is not None and not isinstance(value, kind) or isinstance(value, bool) and kind in (int, float, (int, float)):
            names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
            raise CardError(self.sub(key), f"must be {names}, got {type(value).__name__} {value!r}")
        return value

    def text(self, key: str, default: Any = ..., *, nonempty: bool = True) -> str:
        value = self.get(key, default, kind=str)
        if nonempty and default is ... and not value.strip():
            raise CardError(self.sub(key), "must not be empty")
        return value

    def number(self, key: str, default: Any = ...) -> float:
        return float(self.get(key, default, kind=(int, float)))

    def table(self, key: str, default: Any = ...) -> _Reader | None:
        value = self.get(key, default)
        if value is None:
            return None
        return _Reader(value, self.sub(key))

    def items(self, key: str, default: Any = ...) -> list[tuple[str, Any]]:
        value = self.get(key, default, kind=list)
        return [(f"{self.sub(key)}[{i}]", v) for i, v in enumerate(value)]

    def finish(self) -> None:
        unknown = sorted(set(self.data) - self._seen)
        if unknown:
            raise CardError(self.sub(unknown[0]), "is not a field of the card schema " + SCHEMA)


def _code(data: Any, path: str) -> Code:
    r = _Reader(data, path)
    value = r.text("value")
    scheme = r.text("scheme", "SCT")
    meaning = r.text("meaning")
    if scheme == "SCT" and not value.isdigit():
        raise CardError(r.sub("value"), f"SNOMED CT codes are numeric, got {value!r}")
    r.finish()
    return Code(value=value, meaning=meaning, scheme=scheme)


def _choice(r: _Reader, key: str, allowed: set[str], default: Any = ...) -> str:
    value = r.text(key, default)
    if value not in allowed:
        raise CardError(r.sub(key), f"must be one of {sorted(allowed)}, got {value!r}")
    return value


def _uid(r: _Reader, key: str, default: Any = ...) -> str:
    value = r.text(key, default)
    if value and not conformant_uid(value):
        raise CardError(r.sub(key), f"is not a valid DICOM UID: {value!r}")
    return value


def _identity(r: _Reader) -> Identity:
    created = r.get("created")
    if isinstance(created, (_dt.date, _dt.datetime)):
        created = created.isoformat()[:10]
    elif isinstance(created, str):
        try:
            _dt.date.fromisoformat(created[:10])
        except ValueError as exc:
            raise CardError(r.sub("created"), f"must be an ISO date (YYYY-MM-DD), got {created!r}") from exc
        created = created[:10]
    else:
        raise CardError(r.sub("created"), "must be an ISO date (YYYY-MM-DD)")
    name = r.text("name")
    if len(name) > 64:
        raise CardError(r.sub("name"), "must be at most 64 characters (it becomes a LO element)")
    version = r.text("version")
    if len(version) > 64 or "\\" in version:
        raise CardError(r.sub("version"), "must be at most 64 characters without backslashes")
    authors = tuple(_str_list(r, "authors", default=[]))
    out = Identity(
        name=name,
        version=version,
        uid=_uid(r, "uid", ""),
        manufacturer=r.text("manufacturer"),
        licence=r.text("licence"),
        intended_use=r.text("intended_use"),
        created=created,
        authors=authors,
        description=r.text("description", ""),
    )
    r.finish()
    return out


def _str_list(r: _Reader, key: str, default: Any = ...) -> list[str]:
    out = []
    for path, v in r.items(key, default):
        if not isinstance(v, str) or not v.strip():
            raise CardError(path, f"must be a non-empty string, got {v!r}")
        out.append(v)
    return out


def _target(r: _Reader) -> Target:
    modalities = _str_list(r, "modalities")
    if not modalities:
        raise CardError(r.sub("modalities"), "must name at least one modality")
    for i, m in enumerate(modalities):
        if m not in MODALITIES:
            raise CardError(f"{r.sub('modalities')}[{i}]", f"unknown modality {m!r}")
    body_parts = _str_list(r, "body_parts")
    for i, bp in enumerate(body_parts):
        if not _CS_RE.match(bp):
            raise CardError(
                f"{r.sub('body_parts')}[{i}]",
                f"must be a PS3.16 Annex L BodyPartExamined term (upper case, max 16), got {bp!r}",
            )
    anatomy = tuple(_code(v, p) for p, v in r.items("anatomy"))
    if not anatomy:
        raise CardError(r.sub("anatomy"), "must hold at least one SNOMED CT anatomy code")
    findings = tuple(_code(v, p) for p, v in r.items("findings", []))
    laterality = r.text("laterality", "")
    if laterality and laterality not in LATERALITIES:
        raise CardError(r.sub("laterality"), f"must be one of {sorted(LATERALITIES)} or empty")
    out = Target(tuple(modalities), tuple(body_parts), anatomy, findings, laterality)
    r.finish()
    return out


def _task(r: _Reader) -> Task:
    task_type = _choice(r, "type", TASKS)
    classes = []
    labels: set[str] = set()
    for path, v in r.items("classes"):
        c = _Reader(v, path)
        label = c.text("label")
        if label in labels:
            raise CardError(c.sub("label"), f"duplicate class label {label!r}")
        labels.add(label)
        threshold = c.number("threshold", 0.5)
        if not 0.0 <= threshold <= 1.0:
            raise CardError(c.sub("threshold"), f"must lie in [0, 1], got {threshold}")
        classes.append(
            OutputClass(
                label=label,
                category=_code(c.get("category"), c.sub("category")),
                type=_code(c.get("type"), c.sub("type")),
                threshold=threshold,
            )
        )
        c.finish()
    if not classes:
        raise CardError(r.sub("classes"), "must hold at least one output class")
    exclusive = r.get("exclusive", False, kind=bool)
    if exclusive and task_type != "segmentation":
        raise CardError(r.sub("exclusive"), "only segmentation classes can be exclusive "
                        "(classification classes are scored with softmax already)")
    default_activation = "sigmoid" if task_type == "segmentation" and not exclusive else "softmax"
    activation = _choice(r, "activation", ACTIVATIONS, default_activation)
    if exclusive and activation == "sigmoid":
        raise CardError(r.sub("activation"), "exclusive classes take softmax (or none), not sigmoid")
    output = _choice(r, "output", OUTPUTS, "probabilities")
    if output == "logits" and activation == "none":
        raise CardError(r.sub("activation"), "logits need an activation the node applies "
                        "(sigmoid for independent classes, softmax for exclusive ones)")
    out = Task(task_type, tuple(classes), activation, output, exclusive)
    r.finish()
    return out


def _positive_ints(r: _Reader, key: str, default: Any = ..., allow_dynamic: bool = False) -> tuple | None:
    items = r.items(key, default) if default is ... or key in r.data else None
    if items is None:
        r.get(key, None)
        return None
    out = []
    for path, v in items:
        if allow_dynamic and (v is None or v == 0 or v == "dynamic"):
            out.append(None)
        elif isinstance(v, int) and not isinstance(v, bool) and v > 0:
            out.append(v)
        else:
            raise CardError(path, f"must be a positive integer{' or 0 for dynamic' if allow_dynamic else ''}, got {v!r}")
    return tuple(out)


def _preprocessing(r: _Reader | None) -> Preprocessing:
    if r is None:
        return Preprocessing()
    window = None
    w = r.table("window", None)
    if w is not None:
        width = w.number("width")
        if width <= 0:
            raise CardError(w.sub("width"), "must be positive")
        window = Window(center=w.number("center"), width=width)
        w.finish()
    clip = None
    if "clip" in r.data:
        items = r.items("clip")
        if len(items) != 2 or not all(isinstance(v, (int, float)) for _, v in items):
            raise CardError(r.sub("clip"), "must be [low, high]")
        clip = (float(items[0][1]), float(items[1][1]))
        if clip[0] >= clip[1]:
            raise CardError(r.sub("clip"), "low must be below high")
    normalize = _choice(r, "normalize", {"none", "minmax", "zscore", "fixed"}, "none")
    spacing = None
    if "resample_spacing" in r.data:
        spacing = []
        for path, v in r.items("resample_spacing"):
            if not isinstance(v, (int, float)) or isinstance(v, bool) or v <= 0:
                raise CardError(path, f"must be a positive spacing in mm, got {v!r}")
            spacing.append(float(v))
        spacing = tuple(spacing)
    out = Preprocessing(
        rescale=r.get("rescale", True, kind=bool),
        window=window,
        clip=clip,
        normalize=normalize,
        mean=r.number("mean", 0.0),
        std=r.number("std", 1.0),
        resample_size=_positive_ints(r, "resample_size", None),
        resample_spacing=spacing,
        invert_monochrome1=r.get("invert_monochrome1", True, kind=bool),
    )
    if out.std <= 0:
        raise CardError(r.sub("std"), "must be positive")
    r.finish()
    return out


def _input(r: _Reader) -> Input:
    layout = _choice(r, "layout", LAYOUTS)
    channels = r.get("channels", kind=int)
    if channels < 1:
        raise CardError(r.sub("channels"), "must be at least 1")
    size = _positive_ints(r, "size", allow_dynamic=True)
    want = 2 if layout == "2d" else 3
    if len(size) != want:
        raise CardError(r.sub("size"), f"a {layout} input needs {want} spatial sizes, got {len(size)}")
    min_slices = r.get("min_slices", 1, kind=int)
    if min_slices < 1:
        raise CardError(r.sub("min_slices"), "must be at least 1")
    photometric = _str_list(r, "photometric", ["MONOCHROME2", "MONOCHROME1"])
    for i, p in enumerate(photometric):
        if p not in PHOTOMETRICS:
            raise CardError(f"{r.sub('photometric')}[{i}]", f"unknown photometric interpretation {p!r}")
    spatial = len(size)
    orientation = r.text("orientation", "")
    if orientation:
        orientation = orientation.upper()
        pairs = sorted(next((i for i, p in enumerate(_AXIS_PAIRS) if ch in p), -1) for ch in orientation)
        if layout != "3d":
            raise CardError(r.sub("orientation"), "applies to 3d inputs only (2d models take slices as acquired)")
        if len(orientation) != 3 or pairs != [0, 1, 2]:
            raise CardError(r.sub("orientation"), "must be three axis codes, one of L/R, one of P/A and one "
                            f"of I/S, in the network's axis order (e.g. 'RAS' or 'LPS'), got {orientation!r}")
    divisor = None
    if "size_divisor" in r.data:
        raw = r.get("size_divisor", kind=(int, list))
        divisor = (raw,) * spatial if isinstance(raw, int) else raw
        if len(divisor) != spatial or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in divisor):
            raise CardError(r.sub("size_divisor"), f"must be a positive integer or {spatial} of them, got {raw!r}")
        divisor = tuple(divisor)
        for axis, (s, d) in enumerate(zip(size, divisor, strict=True)):
            if s is not None and s % d:
                raise CardError(r.sub("size_divisor"), f"input.size[{axis}] = {s} is not a multiple of {d}")
    window = _sliding_window(r.table("sliding_window", None), size, divisor)
    out = Input(
        layout=layout,
        channels=channels,
        size=size,
        dtype=_choice(r, "dtype", DTYPES, "float32"),
        min_slices=min_slices,
        photometric=tuple(photometric),
        preprocessing=_preprocessing(r.table("preprocessing", None)),
        orientation=orientation,
        size_divisor=divisor,
        sliding_window=window,
    )
    if window is not None and out.preprocessing.resample_size is not None:
        raise CardError(r.sub("preprocessing.resample_size"), "a sliding window runs at full size or at "
                        "resample_spacing; a fixed resample_size and a window exclude each other")
    r.finish()
    return out


def _sliding_window(w: _Reader | None, size: tuple, divisor: tuple[int, ...] | None) -> SlidingWindow | None:
    if w is None:
        return None
    spatial = len(size)
    if "size" in w.data or any(s is None for s in size):
        wsize = _positive_ints(w, "size")
    else:
        wsize = tuple(size)
    if len(wsize) != spatial:
        raise CardError(w.sub("size"), f"needs {spatial} spatial sizes (network axis order), got {len(wsize)}")
    for axis, (ws, s) in enumerate(zip(wsize, size, strict=True)):
        if s is not None and ws != s:
            raise CardError(w.sub("size"), f"axis {axis}: the window is {ws} but the graph's input is fixed at {s}")
        if divisor is not None and ws % divisor[axis]:
            raise CardError(w.sub("size"), f"axis {axis}: {ws} is not a multiple of input.size_divisor {divisor[axis]}")
    overlap = w.number("overlap", 0.25)
    if not 0.0 <= overlap < 1.0:
        raise CardError(w.sub("overlap"), f"must lie in [0, 1), got {overlap}")
    sigma = w.number("sigma_scale", 0.125)
    if sigma <= 0:
        raise CardError(w.sub("sigma_scale"), "must be positive")
    batch = w.get("batch", 1, kind=int)
    if batch < 1:
        raise CardError(w.sub("batch"), "must be at least 1")
    out = SlidingWindow(size=wsize, overlap=overlap, blending=_choice(w, "blending", BLENDINGS, "gaussian"),
                        sigma_scale=sigma, batch=batch)
    w.finish()
    return out


def _provenance(r: _Reader | None) -> Provenance:
    if r is None:
        return Provenance()
    perf = r.table("performance", None)
    performance: dict[str, float] = {}
    if perf is not None:
        for k in perf.data:
            performance[k] = perf.number(k)
        perf.finish()
    seed = r.get("seed", None, kind=int)
    out = Provenance(
        training_data=r.text("training_data", ""),
        performance=performance,
        parent_uid=_uid(r, "parent_uid", ""),
        training_command=r.text("training_command", ""),
        seed=seed,
        architecture=r.text("architecture", "") or None,
    )
    r.finish()
    return out


def parse_card(data: dict[str, Any]) -> ModelCard:
    """Validate a card given as a mapping (from TOML or JSON). Raises :class:`CardError`."""
    r = _Reader(data, "")
    schema = r.text("schema", SCHEMA)
    if schema not in SUPPORTED_SCHEMAS:
        raise CardError("schema", f"unsupported card schema {schema!r}; this node reads {sorted(SUPPORTED_SCHEMAS)}")
    card = ModelCard(
        identity=_identity(r.table("identity")),
        target=_target(r.table("target")),
        task=_task(r.table("task")),
        input=_input(r.table("input")),
        provenance=_provenance(r.table("provenance", None)),
        schema=schema,
    )
    r.finish()
    if card.provenance.parent_uid and card.provenance.parent_uid == card.identity.uid:
        raise CardError("provenance.parent_uid", "a model cannot be its own parent")
    if card.task.type == "classification" and card.input.layout == "3d" and card.input.min_slices < 1:
        raise CardError("input.min_slices", "must be at least 1")
    return card


def load_card(path: str | Path) -> ModelCard:
    """Read a card from a TOML (``.toml``) or JSON file."""
    path = Path(path)
    raw = path.read_bytes()
    try:
        data = json.loads(raw) if path.suffix.lower() == ".json" else tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CardError("<file>", f"{path} is not valid {'JSON' if path.suffix == '.json' else 'TOML'}: {exc}") from exc
    return parse_card(data)


def card_from_json(text: str) -> ModelCard:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CardError("<card>", f"the card JSON in the model object does not parse: {exc}") from exc
    return parse_card(data)

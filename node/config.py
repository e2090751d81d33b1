"""Configuration: one TOML file, validated as a whole before the node uses any of it.

Every setting has an embedded default, so ``modelnode serve`` with no file runs a node
(AE title MODELNODE, port 11112, SQLite in the data directory). ``config/modelnode.toml`` is the
documented example. The schema is the dataclasses below: a section is a dataclass, a key is a
field, and :func:`load_config` reports every problem with its dotted key, not just the first.

Data directory, in order: ``[storage] data_dir`` in the file, ``$MODELNODE_DATA_DIR``, then
``$XDG_DATA_HOME/modelnode`` (``~/.local/share/modelnode``).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_AE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # PS3.5 AE: no backslash, no controls
# node.security.identity: pbkdf2-sha256$<iterations>$<salt, base64>$<32-byte hash, base64>
_PASSCODE_HASH_RE = re.compile(r"^pbkdf2-sha256\$[1-9][0-9]{3,8}\$[A-Za-z0-9+/=]{8,}\$[A-Za-z0-9+/=]{43,44}$")


class ConfigError(ValueError):
    """The configuration is invalid; ``problems`` lists (dotted key, reason) pairs."""

    def __init__(self, problems: list[tuple[str, str]], source: str = "") -> None:
        self.problems = problems
        where = f" in {source}" if source else ""
        lines = "\n".join(f"  {k}: {r}" for k, r in problems)
        super().__init__(f"{len(problems)} configuration error(s){where}:\n{lines}")


# Every action a caller may be permitted (node.security.policy says what each covers); the
# default of every permission list.
ALL_PERMISSIONS: tuple[str, ...] = ("echo", "store-images", "store-models", "query", "retrieve", "tasks")
# What a [[users]] entry may do in the web console (node.web): "console" reads every page,
# "review" also accepts and rejects results. Never in a default: the console is granted by name.
WEB_PERMISSIONS: tuple[str, ...] = ("console", "review")


@dataclass
class Peer:
    """A known DICOM peer: a C-MOVE destination and, with the allow-list on, a permitted caller."""

    ae_title: str
    host: str
    port: int
    # What this peer may do when it calls us (issue 7 fills in the enforcement).
    permissions: list[str] = field(default_factory=lambda: list(ALL_PERMISSIONS))
    tls: bool = False
    # How the node retrieves a UPS workitem's inputs from this peer (node.ups.retrieve): "move"
    # (C-MOVE to our own AE title, which the peer must know) or "get" (C-GET, same association).
    retrieve: str = "move"


@dataclass
class NodeSection:
    ae_title: str = "MODELNODE"
    bind: str = "0.0.0.0"
    port: int = 11112
    max_pdu: int = 262144  # bytes; 0 means unlimited
    max_associations: int = 16
    acse_timeout: float = 30.0
    dimse_timeout: float = 60.0
    network_timeout: float = 120.0
    # Reject callers that are not listed in [[peers]] (by AE title, and host when given).
    allow_list: bool = False
    # Called AE title that answers "which model fits this study" C-FIND queries (docs/selection.md).
    select_ae_title: str = "MODELNODE_SELECT"
    # Require the called AE title to be ours (some scanners get this wrong; off by default).
    require_called_ae: bool = False
    # SIGTERM: stop accepting, then give associations in progress this long to finish before
    # they are aborted (keep it below the unit's TimeoutStopSec).
    shutdown_timeout: float = 30.0


@dataclass
class StorageSection:
    data_dir: str = ""
    # fsync every file and directory before a C-STORE success. Turn off only on a disposable node.
    fsync: bool = True
    # What a second instance with a known SOP Instance UID does: "replace" (newest wins) or "reject".
    duplicate_policy: str = "replace"
    # Disk watermarks of the data directory's filesystem (node.security.diskguard): at or above
    # high_water_percent used (or below min_free_mb free) a C-STORE is refused with 0xA700
    # (Out of Resources); storing resumes once use is back at or below low_water_percent.
    high_water_percent: float = 95.0
    low_water_percent: float = 90.0
    min_free_mb: int = 0
    # Storage SOP classes beyond pynetdicom's 170. Retired: the standard's retired storage classes
    # (pydicom knows them; e.g. Ultrasound Image Storage (Retired), 1.2.840.10008.5.1.4.1.1.6).
    accept_retired_sop_classes: bool = True
    # Unknown: any proposed abstract syntax that is no known service (a private SOP class, or a
    # public one newer than pydicom), stored like any instance, as Orthanc's UnknownSopClassAccepted.
    accept_unknown_sop_classes: bool = True


@dataclass
class DatabaseSection:
    url: str = ""  # default sqlite:///<data_dir>/modelnode.db


@dataclass
class ModelsSection:
    max_payload_bytes: int = 1 << 30
    # At start, register the reference models shipped in the package (models/reference/*.dcm)
    # when the registry never held a model: none registered and none ever removed.
    register_reference: bool = True


@dataclass
class AnatomySection:
    # A site's own free text -> PS3.16 Annex L term or SNOMED CT code, e.g. "THX" = "CHEST".
    synonyms: dict[str, str] = field(default_factory=dict)


@dataclass
class SiteRule:
    """A site's override of the ranking. Conditions that are empty match everything."""

    action: str  # pin | exclude | route
    models: list[str]  # model names or UIDs
    called_ae: str = ""
    modality: str = ""


CONTRADICTION_POLICIES = ("hold", "image", "header", "mark")


@dataclass
class SelectionSection:
    # A model must reach this anatomy similarity (0-1, see iods/anatomy.py) to be suitable:
    # 0.5 admits a region containing or inside the model's (chest for a lung model) but not a
    # mere neighbour in a compound region (chest for a liver model, similarity 0.4).
    min_anatomy: float = 0.5
    rules: list[SiteRule] = field(default_factory=list)
    # A series is *contradicted* when its header names a region, the image check gives that
    # region (and the regions containing or inside it) a probability below
    # ``contradiction_below`` while another region reaches ``contradiction_other``
    # (docs/selection.md; the reference classifier gave the wrong region 0.03-0.04 and the right
    # one 0.55-0.61 on the two real radiographs it was never tuned on).
    contradiction_below: float = 0.15
    contradiction_other: float = 0.5
    # What a contradiction does: "hold" (run nothing, export nothing; the job ends held for a
    # person: modelnode jobs retry ID --model X | --trust image|header), "image" (select on
    # the image's reading), "header" (select on the header's) or "mark" (select on the header's,
    # run, and mark the result unverified where the radiologist sees it).
    on_contradiction: str = "hold"
    on_contradiction_by_called_ae: dict[str, str] = field(default_factory=dict)

    def contradiction_policy(self, called_ae: str) -> str:
        return self.on_contradiction_by_called_ae.get(called_ae, self.on_contradiction)


@dataclass
class PipelineSection:
    enabled: bool = True
    # A series is complete when no instance arrived for this long and its association ended.
    quiet_seconds: float = 5.0
    group_by: str = "series"  # series | study
    # Per called AE title: {"AI_STUDY" = "study"} groups studies sent to AI_STUDY.
    group_by_called_ae: dict[str, str] = field(default_factory=dict)
    workers: int = 1
    max_attempts: int = 3
    poll_seconds: float = 0.5
    # Read and decode a series while its quiet timer runs (node.pipeline.prefetch); 0 turns it off.
    prefetch_mb: int = 512
    # Also select and run the model then (node.pipeline.headstart); needs the prefetch.
    head_start: bool = True


@dataclass
class InferenceModelOverride:
    model: str  # model name or UID
    providers: list[str] = field(default_factory=list)


@dataclass
class InferenceSection:
    # Tried in order; a provider ONNX Runtime lacks is skipped with a log line.
    providers: list[str] = field(default_factory=lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    intra_op_threads: int = 0  # 0: one per core the node may use
    inter_op_threads: int = 1
    batch_size: int = 16  # slices per Run() for 2D models
    # Sliding-window models: windows per Run() (0: the card's sliding_window.batch on a GPU, at
    # least 2 on the CPU) and Run() calls in flight at once (0: one).
    window_batch: int = 0
    window_workers: int = 0
    trt_fp16: bool = False  # TensorRT may run layers in half precision
    session_cache_mb: int = 2048  # ONNX sessions kept warm, bounded by model size
    overrides: list[InferenceModelOverride] = field(default_factory=list)


# The SEG encodings iods.results can write. A copy of iods.results.SEGMENTATION_TYPES: importing
# that module would load highdicom (0.45 s) on every CLI command; a test checks they agree.
SEGMENTATION_TYPES: tuple[str, ...] = ("BINARY", "LABELMAP")


@dataclass
class ResultsOverride:
    """Another SEG encoding for results of one model, of studies sent to one AE title, or both."""

    segmentation_type: str
    model: str = ""  # model name or UID
    called_ae: str = ""  # the AE title the study was sent to (the route)


@dataclass
class ResultsSection:
    # BINARY: Segmentation Storage, what PACS and viewers display today. LABELMAP: Label Map
    # Segmentation Storage (Supplement 243), far smaller and faster for many exclusive classes.
    segmentation_type: str = "BINARY"
    overrides: list[ResultsOverride] = field(default_factory=list)

    def segmentation_type_for(self, model_uid: str, model_name: str, called_ae: str, *, exclusive: bool) -> str:
        """The SEG encoding for a result of this model on a study sent to ``called_ae``.

        The most specific override that matches wins: model and called AE together, then the
        called AE alone, then the model alone; among equals, the first in the file. The route
        beats the model because it stands for where the result goes, and whether that PACS can
        show a LABELMAP is a harder limit than a model's preference for one.

        LABELMAP applies only to models whose card declares ``exclusive`` classes; others get
        BINARY. A label map holds one class per pixel, independent classes may overlap, and a
        series' SOP class must not depend on what its pixels happen to show.
        """
        best: tuple[int, str] | None = None
        for o in self.overrides:
            if o.model and o.model not in (model_uid, model_name):
                continue
            if o.called_ae and o.called_ae != called_ae:
                continue
            rank = 2 * bool(o.called_ae) + bool(o.model)
            if best is None or rank > best[0]:
                best = (rank, o.segmentation_type)
        chosen = best[1] if best is not None else self.segmentation_type
        return chosen if exclusive else "BINARY"


@dataclass
class ExportRoute:
    destinations: list[str]  # AE titles of [[peers]]
    called_ae: str = ""  # results of studies sent to this AE title ...
    model: str = ""  # ... or made by this model (name or UID); both empty: every result


@dataclass
class ExportSection:
    routes: list[ExportRoute] = field(default_factory=list)
    base_delay_seconds: float = 5.0
    max_delay_seconds: float = 600.0
    max_age_seconds: float = 86400.0
    poll_seconds: float = 1.0


@dataclass
class LoggingSection:
    level: str = "INFO"
    format: str = "text"  # text | json


@dataclass
class TlsSection:
    """DICOM TLS (BCP 195 profile, node.security.tls). Files are PEM."""

    # The SCP speaks TLS. Where: see ``port``.
    enabled: bool = False
    certificate: str = ""  # the node's certificate chain, leaf first (also presented as a client)
    private_key: str = ""  # unencrypted; readable by the service user only
    # CAs that sign peers' certificates: client certificates we accept, servers we call.
    # Empty: the system's trust store for servers we call (client certificates need a file).
    ca_certificates: str = ""
    require_client_certificate: bool = False
    # 0: [node] port speaks TLS only. Else a second listener on this port speaks TLS and
    # [node] port stays plain (a migration period; 2762 is DICOM's registered TLS port).
    port: int = 0
    # As a client ([[peers]] with tls = true): the server certificate must name the peer's host.
    check_hostname: bool = True


@dataclass
class User:
    """A user for User Identity Negotiation (username and passcode, PS3.7 D.3.3.7)."""

    username: str
    # "pbkdf2-sha256$<iterations>$<salt, base64>$<hash, base64>": `modelnode config hash-passcode`.
    passcode_hash: str
    permissions: list[str] = field(default_factory=lambda: list(ALL_PERMISSIONS))


@dataclass
class SecuritySection:
    # Reject associations that carry no (or an unverifiable) username and passcode.
    require_user_identity: bool = False
    # What a caller not listed in [[peers]] may do (matters only with node.allow_list = false).
    default_permissions: list[str] = field(default_factory=lambda: list(ALL_PERMISSIONS))


@dataclass
class AuditSection:
    enabled: bool = True
    path: str = ""  # default <data_dir>/audit.jsonl
    # fsync after every event: an accepted association is on disk before its first C-STORE.
    fsync: bool = False


@dataclass
class MetricsSection:
    # Prometheus text exposition over HTTP (node.ops.metrics). Off by default: it opens a port.
    enabled: bool = False
    bind: str = "127.0.0.1"
    port: int = 9110


@dataclass
class WebSection:
    """The web console (node.web, docs/console.md), served by ``modelnode serve`` in its process."""

    enabled: bool = True
    # Loopback by default. Any other address needs [tls] certificate and private_key (the
    # console then speaks HTTPS only): passcodes and session cookies must not cross a network
    # in clear.
    bind: str = "127.0.0.1"
    # 11180: clear of Orthanc's 8042, the metrics' 9110, DICOM's 104/11112/2762 and the 8000/8080
    # every development server defaults to.
    port: int = 11180
    # A signed-in session ends after this many minutes (and when the node restarts).
    session_minutes: float = 480.0
    # Single sign-on through a reverse proxy: the header that names the authenticated user
    # (e.g. "X-Remote-User"), believed only from trusted_proxies. Off (""): sign in with the
    # passcode of a [[users]] entry. Either way the user needs "console" among its permissions.
    proxy_user_header: str = ""
    trusted_proxies: list[str] = field(default_factory=lambda: ["127.0.0.1", "::1"])


@dataclass
class UpsSection:
    """AI on request: the UPS SCP and the Task Performer (node.ups, docs/dimse.md)."""

    # Offer UPS Push, Pull, Watch, Event and Query (N-CREATE, N-ACTION, N-GET, N-SET, C-FIND).
    enabled: bool = True
    # Perform the workitems whose Scheduled Workitem Code Sequence uses the 99MODELNODE scheme:
    # retrieve the inputs, run the model, store the results, complete. Off: a worklist only.
    perform: bool = True
    # Retrieving the inputs: attempts in all on a transient failure (peer down, association
    # aborted), waiting base_delay * 2**n (at most max_delay) between them; then CANCELED.
    retrieve_attempts: int = 3
    retrieve_base_delay: float = 2.0
    retrieve_max_delay: float = 30.0
    # Longest silence from the source peer during one C-MOVE or C-GET (its DIMSE timeout).
    retrieve_timeout: float = 600.0
    # A workitem a killed node left IN PROGRESS is resumed at start; after this many starts it
    # is CANCELED (a workitem that kills the node must not do so for ever).
    max_attempts: int = 3
    # N-EVENT-REPORT deliveries per subscriber and event before the event is dropped (logged).
    event_attempts: int = 3
    # How often the performer looks at the jobs of the workitems it performs.
    poll_seconds: float = 0.5
    # Pull mode (node.ups.pull): Task Managers ([[peers]] AE titles) asked every pull_seconds for
    # SCHEDULED workitems coded 99MODELNODE, which the node claims there, performs and completes.
    pull_from: list[str] = field(default_factory=list)
    pull_seconds: float = 10.0


@dataclass
class Config:
    node: NodeSection = field(default_factory=NodeSection)
    storage: StorageSection = field(default_factory=StorageSection)
    database: DatabaseSection = field(default_factory=DatabaseSection)
    models: ModelsSection = field(default_factory=ModelsSection)
    anatomy: AnatomySection = field(default_factory=AnatomySection)
    selection: SelectionSection = field(default_factory=SelectionSection)
    pipeline: PipelineSection = field(default_factory=PipelineSection)
    inference: InferenceSection = field(default_factory=InferenceSection)
    results: ResultsSection = field(default_factory=ResultsSection)
    export: ExportSection = field(default_factory=ExportSection)
    logging: LoggingSection = field(default_factory=LoggingSection)
    tls: TlsSection = field(default_factory=TlsSection)
    security: SecuritySection = field(default_factory=SecuritySection)
    audit: AuditSection = field(default_factory=AuditSection)
    metrics: MetricsSection = field(default_factory=MetricsSection)
    ups: UpsSection = field(default_factory=UpsSection)
    web: WebSection = field(default_factory=WebSection)
    peers: list[Peer] = field(default_factory=list)
    users: list[User] = field(default_factory=list)
    source: str = ""  # the file it came from, "" for the embedded defaults

    @property
    def data_dir(self) -> Path:
        if self.storage.data_dir:
            return Path(self.storage.data_dir).expanduser()
        env = os.environ.get("MODELNODE_DATA_DIR")
        if env:
            return Path(env).expanduser()
        xdg = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
        return Path(xdg) / "modelnode"

    @property
    def database_url(self) -> str:
        return self.database.url or f"sqlite:///{(self.data_dir / 'modelnode.db').resolve()}"

    @property
    def audit_path(self) -> Path:
        return Path(self.audit.path).expanduser() if self.audit.path else self.data_dir / "audit.jsonl"

    def user(self, username: str) -> User | None:
        for u in self.users:
            if u.username == username:
                return u
        return None

    def peer(self, ae_title: str) -> Peer | None:
        for p in self.peers:
            if p.ae_title == ae_title:
                return p
        return None


# --------------------------------------------------------------------------- generic loader


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, key: str, problems: list[tuple[str, str]]) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            problems.append((key, f"must be a table, got {type(value).__name__}"))
            return tp() if _has_defaults(tp) else None
        return _build(tp, value, key, problems)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            problems.append((key, f"must be a list, got {type(value).__name__}"))
            return []
        return [_convert(v, item_tp, f"{key}[{i}]", problems) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
            problems.append((key, "must be a table of strings"))
            return {}
        return {str(k): v for k, v in value.items()}
    if origin in (typing.Union, types.UnionType):
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float) and isinstance(value, bool) or not isinstance(value, tp):
        problems.append((key, f"must be {_type_name(tp)}, got {type(value).__name__} {value!r}"))
        return None
    return value


def _has_defaults(tp: Any) -> bool:
    return all(f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
               for f in dataclasses.fields(tp))


def _build(cls: Any, data: dict[str, Any], prefix: str, problems: list[tuple[str, str]]) -> Any:
    hints = typing.get_type_hints(cls)
    kwargs = {}
    names = {f.name for f in dataclasses.fields(cls) if f.name != "source"}
    for k in data:
        if k not in names:
            problems.append((f"{prefix}.{k}" if prefix else k, "unknown key"))
    for f in dataclasses.fields(cls):
        if f.name == "source" or f.name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and f.name != "source":
                problems.append((f"{prefix}.{f.name}" if prefix else f.name, "is required"))
            continue
        key = f"{prefix}.{f.name}" if prefix else f.name
        value = _convert(data[f.name], hints[f.name], key, problems)
        if value is not None:
            kwargs[f.name] = value
    try:
        return cls(**kwargs)
    except TypeError:
        return None


# --------------------------------------------------------------------------- semantic checks


PERMISSIONS = set(ALL_PERMISSIONS)


def _check(cfg: Config, problems: list[tuple[str, str]]) -> None:
    n = cfg.node
    if not _AE_RE.match(n.ae_title) or n.ae_title != n.ae_title.strip():
        problems.append(("node.ae_title", f"{n.ae_title!r} is not a valid AE title (1-16 characters, no backslash)"))
    if n.select_ae_title and not _AE_RE.match(n.select_ae_title):
        problems.append(("node.select_ae_title", f"{n.select_ae_title!r} is not a valid AE title"))
    try:
        ipaddress.ip_address(n.bind)
    except ValueError:
        if not re.match(r"^[A-Za-z0-9.-]+$", n.bind):
            problems.append(("node.bind", f"{n.bind!r} is neither an IP address nor a host name"))
    if not 0 < n.port < 65536:
        problems.append(("node.port", f"{n.port} is not a TCP port (1-65535)"))
    if n.max_pdu and not 4096 <= n.max_pdu <= 0xFFFFFFFF:
        problems.append(("node.max_pdu", "must be 0 (unlimited) or 4096 to 4294967295 bytes"))
    if n.max_associations < 1:
        problems.append(("node.max_associations", "must be at least 1"))
    for key in ("acse_timeout", "dimse_timeout", "network_timeout"):
        if getattr(n, key) <= 0:
            problems.append((f"node.{key}", "must be a positive number of seconds"))
    if cfg.storage.duplicate_policy not in ("replace", "reject"):
        problems.append(("storage.duplicate_policy", "must be 'replace' or 'reject'"))
    if cfg.models.max_payload_bytes <= 0 or cfg.models.max_payload_bytes > (2 << 30):
        problems.append(("models.max_payload_bytes", "must be positive and at most 2 GiB (the ONNX protobuf limit)"))
    url = cfg.database.url
    if url and not (url.startswith("sqlite:") or url.startswith("postgres")):
        problems.append(("database.url", "must start with sqlite:/// or postgresql://"))
    if cfg.logging.level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        problems.append(("logging.level", "must be DEBUG, INFO, WARNING or ERROR"))
    if cfg.logging.format not in ("text", "json"):
        problems.append(("logging.format", "must be 'text' or 'json'"))
    if not 0.0 <= cfg.selection.min_anatomy <= 1.0:
        problems.append(("selection.min_anatomy", "must lie in [0, 1]"))
    for key, value in [("selection.on_contradiction", cfg.selection.on_contradiction)] + [
            (f"selection.on_contradiction_by_called_ae.{ae}", v)
            for ae, v in cfg.selection.on_contradiction_by_called_ae.items()]:
        if value not in CONTRADICTION_POLICIES:
            problems.append((key, f"must be one of {', '.join(CONTRADICTION_POLICIES)}"))
    for key in ("contradiction_below", "contradiction_other"):
        if not 0.0 <= getattr(cfg.selection, key) <= 1.0:
            problems.append((f"selection.{key}", "must lie in [0, 1]"))
    for i, rule in enumerate(cfg.selection.rules):
        if rule is None:
            continue
        if rule.action not in ("pin", "exclude", "route"):
            problems.append((f"selection.rules[{i}].action", "must be 'pin', 'exclude' or 'route'"))
        if not rule.models:
            problems.append((f"selection.rules[{i}].models", "must name at least one model (name or UID)"))
    pl = cfg.pipeline
    if pl.quiet_seconds < 0:
        problems.append(("pipeline.quiet_seconds", "must not be negative"))
    if pl.group_by not in ("series", "study"):
        problems.append(("pipeline.group_by", "must be 'series' or 'study'"))
    for ae, mode in pl.group_by_called_ae.items():
        if mode not in ("series", "study"):
            problems.append((f"pipeline.group_by_called_ae.{ae}", "must be 'series' or 'study'"))
    if pl.workers < 1:
        problems.append(("pipeline.workers", "must be at least 1"))
    if pl.max_attempts < 1:
        problems.append(("pipeline.max_attempts", "must be at least 1"))
    if pl.prefetch_mb < 0:
        problems.append(("pipeline.prefetch_mb", "must be 0 (off) or a size in MiB"))
    inf = cfg.inference
    known = {"CUDAExecutionProvider", "CPUExecutionProvider", "TensorrtExecutionProvider",
             "OpenVINOExecutionProvider", "ROCMExecutionProvider", "DmlExecutionProvider", "CoreMLExecutionProvider"}
    for i, prov in enumerate(inf.providers):
        if prov not in known:
            problems.append((f"inference.providers[{i}]", f"unknown execution provider {prov!r}"))
    if inf.intra_op_threads < 0 or inf.inter_op_threads < 0:
        problems.append(("inference.intra_op_threads", "thread counts must not be negative"))
    if inf.batch_size < 1:
        problems.append(("inference.batch_size", "must be at least 1"))
    for key in ("window_batch", "window_workers"):
        if getattr(inf, key) < 0:
            problems.append((f"inference.{key}", "must be 0 (automatic) or positive"))
    _check_results(cfg.results, problems)
    peer_names = {p.ae_title for p in cfg.peers if p is not None}
    for i, route in enumerate(cfg.export.routes):
        if route is None:
            continue
        for ae in route.destinations:
            if ae not in peer_names:
                problems.append((f"export.routes[{i}].destinations", f"{ae!r} is not a configured peer"))
    ex = cfg.export
    if ex.base_delay_seconds <= 0 or ex.max_delay_seconds < ex.base_delay_seconds:
        problems.append(("export.base_delay_seconds", "must be positive and at most export.max_delay_seconds"))
    if ex.max_age_seconds <= 0:
        problems.append(("export.max_age_seconds", "must be positive"))
    seen: set[str] = set()
    for i, p in enumerate(cfg.peers):
        if p is None:
            continue
        key = f"peers[{i}]"
        if not _AE_RE.match(p.ae_title or ""):
            problems.append((f"{key}.ae_title", f"{p.ae_title!r} is not a valid AE title"))
        if p.ae_title in seen:
            problems.append((f"{key}.ae_title", f"duplicate peer {p.ae_title!r}"))
        seen.add(p.ae_title)
        if not 0 < p.port < 65536:
            problems.append((f"{key}.port", f"{p.port} is not a TCP port"))
        for perm in p.permissions:
            if perm not in PERMISSIONS:
                problems.append((f"{key}.permissions", f"unknown permission {perm!r}; known: {sorted(PERMISSIONS)}"))
        if p.retrieve not in ("move", "get"):
            problems.append((f"{key}.retrieve", f"must be 'move' or 'get', got {p.retrieve!r}"))
    _check_ups(cfg.ups, problems)
    for i, ae in enumerate(cfg.ups.pull_from):
        if ae not in peer_names:
            problems.append((f"ups.pull_from[{i}]", f"{ae!r} is not a configured peer"))
    _check_service(cfg, problems)


def _check_ups(ups: UpsSection, problems: list[tuple[str, str]]) -> None:
    for key in ("retrieve_attempts", "max_attempts", "event_attempts"):
        if getattr(ups, key) < 1:
            problems.append((f"ups.{key}", "must be at least 1"))
    if ups.retrieve_base_delay < 0 or ups.retrieve_max_delay < ups.retrieve_base_delay:
        problems.append(("ups.retrieve_base_delay", "must not be negative nor above ups.retrieve_max_delay"))
    for key in ("retrieve_timeout", "poll_seconds", "pull_seconds"):
        if getattr(ups, key) <= 0:
            problems.append((f"ups.{key}", "must be a positive number of seconds"))


def _check_results(res: ResultsSection, problems: list[tuple[str, str]]) -> None:
    if res.segmentation_type not in SEGMENTATION_TYPES:
        problems.append(("results.segmentation_type", f"must be one of {', '.join(SEGMENTATION_TYPES)}, "
                         f"got {res.segmentation_type!r}"))
    seen: dict[tuple[str, str], int] = {}
    for i, o in enumerate(res.overrides):
        if o is None:
            continue
        key = f"results.overrides[{i}]"
        if o.segmentation_type not in SEGMENTATION_TYPES:
            problems.append((f"{key}.segmentation_type", f"must be one of {', '.join(SEGMENTATION_TYPES)}, "
                             f"got {o.segmentation_type!r}"))
        if not o.model and not o.called_ae:
            problems.append((key, "must name a model, a called_ae or both (results.segmentation_type is "
                             "the setting for everything else)"))
        if o.called_ae and not _AE_RE.match(o.called_ae):
            problems.append((f"{key}.called_ae", f"{o.called_ae!r} is not a valid AE title"))
        if (o.model, o.called_ae) in seen:
            problems.append((key, f"same model and called_ae as results.overrides[{seen[o.model, o.called_ae]}]"))
        seen.setdefault((o.model, o.called_ae), i)


def _check_service(cfg: Config, problems: list[tuple[str, str]]) -> None:
    """Issue 7 sections: shutdown, watermarks, TLS, users, security, audit, metrics.

    Files are checked for existence here; that they parse (and that the key matches the
    certificate) is checked by ``modelnode config check`` and at start (node.security.tls.validate),
    because every CLI command loads the configuration and an operator need not be able to
    read the service's private key.
    """
    if cfg.node.shutdown_timeout < 0:
        problems.append(("node.shutdown_timeout", "must not be negative"))
    st = cfg.storage
    if not 0 < st.high_water_percent <= 100:
        problems.append(("storage.high_water_percent", "must lie in (0, 100]"))
    if not 0 < st.low_water_percent <= st.high_water_percent:
        problems.append(("storage.low_water_percent", "must be positive and at most storage.high_water_percent"))
    if st.min_free_mb < 0:
        problems.append(("storage.min_free_mb", "must not be negative"))
    tls = cfg.tls
    if tls.enabled:
        for key in ("certificate", "private_key"):
            if not getattr(tls, key):
                problems.append((f"tls.{key}", "is required when tls.enabled = true"))
        if tls.port and tls.port == cfg.node.port:
            problems.append(("tls.port", "must differ from node.port (0 makes node.port the TLS port)"))
    if not 0 <= tls.port < 65536:
        problems.append(("tls.port", f"{tls.port} is not 0 or a TCP port (1-65535)"))
    if tls.require_client_certificate and not tls.ca_certificates:
        problems.append(("tls.require_client_certificate", "needs tls.ca_certificates to verify client certificates"))
    if tls.private_key and not tls.certificate:
        problems.append(("tls.certificate", "is required with tls.private_key"))
    for key in ("certificate", "private_key", "ca_certificates"):
        value = getattr(tls, key)
        if value and not Path(value).expanduser().is_file():
            problems.append((f"tls.{key}", f"{value} is not a file"))
    names: set[str] = set()
    for i, u in enumerate(cfg.users):
        if u is None:
            continue
        key = f"users[{i}]"
        if not u.username or len(u.username) > 256:
            problems.append((f"{key}.username", "must be 1-256 characters"))
        if u.username in names:
            problems.append((f"{key}.username", f"duplicate user {u.username!r}"))
        names.add(u.username)
        if not _PASSCODE_HASH_RE.match(u.passcode_hash or ""):
            problems.append((f"{key}.passcode_hash",
                             "must be pbkdf2-sha256$ITERATIONS$SALT$HASH (make one: modelnode config hash-passcode)"))
        for perm in u.permissions:
            if perm not in PERMISSIONS and perm not in WEB_PERMISSIONS:
                problems.append((f"{key}.permissions",
                                 f"unknown permission {perm!r}; known: {sorted(PERMISSIONS | set(WEB_PERMISSIONS))}"))
    if cfg.security.require_user_identity and not cfg.users:
        problems.append(("security.require_user_identity", "no [[users]] are configured: every association would be rejected"))
    for perm in cfg.security.default_permissions:
        if perm not in PERMISSIONS:
            problems.append(("security.default_permissions", f"unknown permission {perm!r}; known: {sorted(PERMISSIONS)}"))
    m = cfg.metrics
    try:
        ipaddress.ip_address(m.bind)
    except ValueError:
        problems.append(("metrics.bind", f"{m.bind!r} is not an IP address"))
    if not 0 <= m.port < 65536:
        problems.append(("metrics.port", f"{m.port} is not a TCP port"))
    if m.enabled and m.port in (cfg.node.port, tls.port):
        problems.append(("metrics.port", "must differ from the DICOM ports"))
    _check_web(cfg, problems)


def _check_web(cfg: Config, problems: list[tuple[str, str]]) -> None:
    w = cfg.web
    try:
        loopback = ipaddress.ip_address(w.bind).is_loopback
    except ValueError:
        problems.append(("web.bind", f"{w.bind!r} is not an IP address"))
        loopback = True
    if not 0 <= w.port < 65536:
        problems.append(("web.port", f"{w.port} is not a TCP port"))
    if w.enabled and w.port and w.port in (cfg.node.port, cfg.tls.port, cfg.metrics.port if cfg.metrics.enabled else -1):
        problems.append(("web.port", "must differ from the DICOM and metrics ports"))
    if w.enabled and not loopback and not (cfg.tls.certificate and cfg.tls.private_key):
        problems.append(("web.bind", f"{w.bind} is beyond loopback: the console needs tls.certificate and "
                         "tls.private_key to serve HTTPS there (or bind 127.0.0.1 behind a TLS proxy)"))
    if w.session_minutes <= 0:
        problems.append(("web.session_minutes", "must be a positive number of minutes"))
    if w.proxy_user_header and not re.match(r"^[A-Za-z0-9-]{1,64}$", w.proxy_user_header):
        problems.append(("web.proxy_user_header", f"{w.proxy_user_header!r} is not an HTTP header name"))
    for i, addr in enumerate(w.trusted_proxies):
        try:
            ipaddress.ip_address(addr)
        except ValueError:
            problems.append((f"web.trusted_proxies[{i}]", f"{addr!r} is not an IP address"))


def parse_config(data: dict[str, Any], source: str = "") -> Config:
    problems: list[tuple[str, str]] = []
    cfg = _build(Config, data, "", problems)
    if cfg is None:
        raise ConfigError(problems, source)
    cfg.peers = [p for p in cfg.peers if p is not None]
    cfg.users = [u for u in cfg.users if u is not None]
    _check(cfg, problems)
    if problems:
        raise ConfigError(problems, source)
    cfg.source = source
    return cfg


def load_config(path: str | Path | None = None) -> Config:
    """Load and validate ``path``; with None, ``$MODELNODE_CONFIG`` or the embedded defaults."""
    if path is None:
        path = os.environ.get("MODELNODE_CONFIG") or None
    if path is None:
        return parse_config({})
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ConfigError([("<file>", f"{path} does not exist")], str(path)) from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError([("<file>", f"not valid TOML: {exc}")], str(path)) from exc
    return parse_config(data, str(path))

"""``modelnode echo | store | find | fetch``: the node's DICOM client commands.

Each talks to one peer given as ``--to AE@HOST:PORT`` or as the AE title of a configured
``[[peers]]`` entry. Transient failures (peer not up yet, association rejected-transient or
aborted) are retried with exponential backoff (``--retries``, ``--retry-delay``,
``--retry-max-delay``); a failure status is final. Exit code 6 (EXIT_PEER) when the peer could
not be reached or answered with a failure.

DICOM TLS (BCP 195, node.security.tls): ``--tls`` with ``--tls-ca`` (else the system trust store),
``--tls-cert``/``--tls-key`` (a client certificate, for peers that require one) and
``--tls-no-hostname-check``. A ``--to`` that is a ``[[peers]]`` entry with ``tls = true`` uses the
configuration's ``[tls]`` files without ``--tls``; the options given override them. A failed
handshake is final (not retried) and says why.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import time
from pathlib import Path
from typing import Any

from node.cli.common import (
    EXIT_INVALID,
    EXIT_NOT_FOUND,
    EXIT_PEER,
    EXIT_USAGE,
    CliError,
    config_from_args,
)

# Return keys asked for when a query names no keys of its own.
DEFAULT_KEYS = {
    "PATIENT": ["PatientName", "PatientID", "PatientBirthDate", "PatientSex", "NumberOfPatientRelatedStudies"],
    "STUDY": ["PatientName", "PatientID", "StudyDate", "StudyDescription", "ModalitiesInStudy",
              "NumberOfStudyRelatedInstances", "StudyInstanceUID"],
    "SERIES": ["Modality", "BodyPartExamined", "SeriesNumber", "SeriesDescription", "NumberOfSeriesRelatedInstances",
               "SeriesInstanceUID"],
    "IMAGE": ["InstanceNumber", "SOPClassUID", "SOPInstanceUID"],
}


def _peer(args: argparse.Namespace, cfg: Any) -> Any:
    from node.scu.client import Address

    text = args.to
    if "@" not in text:
        known = cfg.peer(text)
        if known is None:
            raise CliError(f"--to {text!r}: neither AE@HOST:PORT nor the AE title of a configured peer", EXIT_USAGE)
        return Address(known.ae_title, known.host, known.port)
    try:
        return Address.parse(text)
    except ValueError as exc:
        raise CliError(f"--to: {exc}", EXIT_USAGE) from exc


def _configured_tls_peer(cfg: Any, peer: Any) -> Any:
    """The ``[[peers]]`` entry with ``tls = true`` that ``peer`` is (same AE title, host and port:
    ``--to AE`` or its full address), else None. The same AE title elsewhere is another port,
    perhaps a plain one, so it does not count."""
    known = cfg.peer(peer.ae_title)
    if known is None or not known.tls or (known.host, known.port) != (peer.host, peer.port):
        return None
    return known


# Which option stands for which [tls] key, to name the right one in an error.
_TLS_FLAGS = {"tls.certificate": "--tls-cert", "tls.private_key": "--tls-key", "tls.ca_certificates": "--tls-ca"}


def _tls_files(args: argparse.Namespace, cfg: Any, peer: Any) -> tuple[str, str, str, bool, set[str]] | None:
    """(certificate, private key, CA file, check host name, keys given as options), or None
    for a plain connection: the configuration's ``[tls]`` for a configured ``tls = true`` peer,
    nothing (system trust store) otherwise, each overridden by the ``--tls-*`` option given."""
    flags = {"tls.certificate": args.tls_cert, "tls.private_key": args.tls_key, "tls.ca_certificates": args.tls_ca}
    given = {key for key, value in flags.items() if value}
    if args.tls_key and not args.tls_cert:
        raise CliError("--tls-key needs --tls-cert (the certificate it belongs to)", EXIT_USAGE)
    # Any --tls-* option asks for TLS: a client certificate must never go unused on a plain connection.
    explicit = args.tls or bool(given) or args.tls_no_hostname_check
    known = _configured_tls_peer(cfg, peer)
    if not explicit and known is None:
        return None
    t = cfg.tls
    cert, key, ca = (t.certificate, t.private_key, t.ca_certificates) if known is not None else ("", "", "")
    check = t.check_hostname if known is not None else True
    if args.tls_cert:
        cert, key = args.tls_cert, args.tls_key or ""  # no --tls-key: the key is in the certificate file
    ca = args.tls_ca or ca
    for key_name in given:
        if not Path(flags[key_name]).expanduser().is_file():
            raise CliError(f"{_TLS_FLAGS[key_name]}: no such file: {flags[key_name]}", EXIT_NOT_FOUND)
    return cert, key, ca, check and not args.tls_no_hostname_check, given


def _client_tls(args: argparse.Namespace, cfg: Any, peer: Any) -> tuple[Any, str] | None:
    """``Options.tls`` for calling ``peer``: a BCP 195 client context and the host to verify."""
    from node.security import tls

    files = _tls_files(args, cfg, peer)
    if files is None:
        return None
    cert, key, ca, check, given = files
    try:
        return tls.client_context_from(cert, key, ca, check), peer.host
    except tls.TlsConfigError as exc:
        where = _TLS_FLAGS[exc.key] if exc.key in given else f"{exc.key} (configuration)"
        raise CliError(f"{where}: {exc.reason}", EXIT_INVALID) from exc


def _receiver_tls(args: argparse.Namespace, cfg: Any) -> Any:
    """The server context of the ``--listen`` storage SCP with ``--listen-tls``: our certificate
    (``--tls-cert``/``--tls-key``, else the configuration's) and, to verify a client certificate
    the sender presents, ``--tls-ca`` or the configuration's CA file."""
    from node.security import tls

    if not args.listen_tls:
        return None
    if not args.listen:
        raise CliError("--listen-tls is for --listen", EXIT_USAGE)
    cert, key = (args.tls_cert, args.tls_key or "") if args.tls_cert else (cfg.tls.certificate, cfg.tls.private_key)
    if not cert:
        raise CliError("--listen-tls needs a certificate: --tls-cert and --tls-key, or tls.certificate and "
                       "tls.private_key in the configuration", EXIT_USAGE)
    given = ({"tls.certificate", "tls.private_key"} if args.tls_cert else set()) | (
        {"tls.ca_certificates"} if args.tls_ca else set())
    try:
        # --timeout bounds the handshake of each accepted connection (node.security.tls defers it to the
        # association's thread), as it bounds every other wait on the peer; not the node's
        # network_timeout (120 s by default), which is what a stuck handshake used to cost.
        return tls.server_context_from(cert, key, args.tls_ca or cfg.tls.ca_certificates,
                                       io_timeout=args.timeout)
    except tls.TlsConfigError as exc:
        where = _TLS_FLAGS[exc.key] if exc.key in given else f"{exc.key} (configuration)"
        raise CliError(f"{where}: {exc.reason}", EXIT_INVALID) from exc


def _options(args: argparse.Namespace, cfg: Any, peer: Any) -> Any:
    from node.scu.client import Options, RetryPolicy

    if args.retries < 0:
        raise CliError("--retries must be 0 or more", EXIT_USAGE)
    return Options(
        calling_ae=args.aet or cfg.node.ae_title,
        acse_timeout=args.timeout,
        dimse_timeout=args.timeout,
        network_timeout=args.timeout,
        connect_timeout=min(args.timeout, 10.0),
        max_pdu=cfg.node.max_pdu,
        retry=RetryPolicy(attempts=args.retries + 1, base_delay=args.retry_delay, max_delay=args.retry_max_delay),
        tls=_client_tls(args, cfg, peer),
    )


def _setup(args: argparse.Namespace) -> tuple[Any, Any, Any]:
    """(peer, options, configuration)."""
    # pynetdicom logs every refused connection (and failed TLS handshake) at ERROR; our own lines
    # say what happened.
    if args.verbose < 2:
        logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)
    cfg = config_from_args(args)
    peer = _peer(args, cfg)
    return peer, _options(args, cfg, peer), cfg


def _peer_failure(exc: Exception) -> CliError:
    return CliError(str(exc), EXIT_PEER)


# --------------------------------------------------------------------------- echo


def cmd_echo(args: argparse.Namespace) -> int:
    from node.scu import client as scu

    peer, options, _ = _setup(args)
    start = time.monotonic()
    try:
        scu.echo(peer, options)
    except scu.PeerError as exc:
        raise _peer_failure(exc) from exc
    print(f"{peer}: C-ECHO success ({(time.monotonic() - start) * 1000:.0f} ms)")
    return 0


# --------------------------------------------------------------------------- store


def _expand(paths: list[str], recursive: bool) -> list[Path]:
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            if not recursive:
                raise CliError(f"{p} is a directory (use -r to send the files under it)", EXIT_USAGE)
            files.extend(sorted(f for f in p.rglob("*") if f.is_file()))
        elif p.is_file():
            files.append(p)
        else:
            raise CliError(f"no such file: {p}", EXIT_NOT_FOUND)
    return files


def cmd_store(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from node.scu import client as scu

    peer, options, _ = _setup(args)
    files = _expand(args.files, args.recursive)
    if not files:
        raise CliError("no files to send", EXIT_NOT_FOUND)
    bar = tqdm(total=len(files), desc=f"C-STORE to {peer.ae_title}", unit="file", file=sys.stderr,
               disable=None if len(files) > 1 else True, leave=False)
    try:
        results = scu.store(files, peer, options, progress=lambda r: bar.update(1))
    except scu.PeerError as exc:
        raise _peer_failure(exc) from exc
    finally:
        bar.close()
    unreadable = [r for r in results if r.status is None and "not a DICOM file" in r.error]
    failed = [r for r in results if not r.ok]
    for r in failed:
        detail = r.error or f"status 0x{r.status:04X}"
        print(f"failed: {r.path}: {detail}", file=sys.stderr)
    for r in results:
        if r.ok and r.status != 0 and r.status is not None:
            print(f"warning: {r.path}: status 0x{r.status:04X}", file=sys.stderr)
    print(f"{peer}: stored {len(results) - len(failed)} of {len(results)} file(s)")
    if failed:
        return EXIT_INVALID if len(unreadable) == len(failed) else EXIT_PEER
    return 0


# --------------------------------------------------------------------------- find

_PATH_RE = re.compile(r"^(?P<name>[A-Za-z0-9]+|\(?[0-9A-Fa-f]{4},[0-9A-Fa-f]{4}\)?)(?:\[(?P<index>\d+)\])?$")


def _tag(name: str) -> int:
    from pydicom.datadict import tag_for_keyword

    if "," in name:
        group, elem = name.strip("()").split(",")
        return (int(group, 16) << 16) | int(elem, 16)
    tag = tag_for_keyword(name)
    if tag is None:
        raise CliError(f"unknown attribute {name!r} (use a DICOM keyword or gggg,eeee)", EXIT_USAGE)
    return tag


def set_key(ds: Any, spec: str) -> None:
    """Apply one findscu-style key: ``Keyword``, ``Keyword=value``, ``gggg,eeee=value`` or a path
    through sequences, ``Seq[0].Keyword=value``."""
    from pydicom.datadict import dictionary_VR
    from pydicom.dataelem import DataElement
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    path, sep, value = spec.partition("=")
    parts = [p.strip() for p in path.split(".")] if path else []
    if not parts:
        raise CliError(f"-k {spec!r}: empty key", EXIT_USAGE)
    current = ds
    for i, part in enumerate(parts):
        m = _PATH_RE.match(part)
        if not m:
            raise CliError(f"-k {spec!r}: cannot read {part!r}", EXIT_USAGE)
        tag = _tag(m.group("name"))
        last = i == len(parts) - 1
        try:
            vr = dictionary_VR(tag)
        except KeyError as exc:
            raise CliError(f"-k {spec!r}: {part} is not in the DICOM dictionary", EXIT_USAGE) from exc
        if not last or m.group("index") is not None:
            if vr != "SQ":
                raise CliError(f"-k {spec!r}: {part} is not a sequence", EXIT_USAGE)
            if tag not in current:
                current.add(DataElement(tag, "SQ", Sequence([])))
            seq = current[tag].value
            index = int(m.group("index") or 0)
            while len(seq) <= index:
                seq.append(Dataset())
            if last:
                if sep:
                    raise CliError(f"-k {spec!r}: a sequence item takes no value", EXIT_USAGE)
                return
            current = seq[index]
            continue
        if vr == "SQ":
            if sep and value:
                raise CliError(f"-k {spec!r}: a sequence takes no value (name an attribute inside it)", EXIT_USAGE)
            if tag not in current:
                current.add(DataElement(tag, "SQ", Sequence([])))
            return
        vr = vr if len(vr) == 2 else "US"
        current.add(DataElement(tag, vr, value if value != "" else None))


def _plain(value: Any) -> Any:
    """A JSON-friendly value: strings, numbers, lists, and dicts for sequence items."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    if isinstance(value, Sequence):
        return [_ds_dict(item) for item in value]
    if isinstance(value, Dataset):
        return _ds_dict(value)
    if value is None:
        return ""
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return [_plain(v) for v in value]
    if isinstance(value, (int, float)):
        return value
    return str(value)


def _ds_dict(ds: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for elem in ds:
        if elem.tag in (0x00080005,):
            continue
        name = elem.keyword or f"{elem.tag.group:04X},{elem.tag.element:04X}"
        out[name] = _plain(elem.value)
    return out


def _cell(value: Any) -> str:
    if isinstance(value, list):
        return "\\".join(_cell(v) for v in value)
    if isinstance(value, dict):
        # A coded item reads best as VALUE^SCHEME (meaning), the rest as key=value.
        code = value.get("ConceptCodeSequence", [value])[0] if value.get("ConceptCodeSequence") else value
        if isinstance(code, dict) and "CodeValue" in code:
            text = f"{code.get('CodeValue', '')}"
            if code.get("CodingSchemeDesignator"):
                text += f"^{code['CodingSchemeDesignator']}"
            if code.get("CodeMeaning"):
                text += f" ({code['CodeMeaning']})"
            return text
        return ",".join(f"{k}={_cell(v)}" for k, v in value.items())
    return str(value)


def _table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    cells = [[_cell(r.get(c, "")) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)


def build_identifier(keys: list[str], level: str | None) -> tuple[Any, str]:
    from pydicom.dataset import Dataset

    ds = Dataset()
    for spec in keys:
        set_key(ds, spec)
    if level:
        ds.QueryRetrieveLevel = level.upper()
    elif "QueryRetrieveLevel" not in ds or not ds.QueryRetrieveLevel:
        ds.QueryRetrieveLevel = "STUDY"
    lvl = str(ds.QueryRetrieveLevel).upper()
    if lvl not in DEFAULT_KEYS:
        raise CliError(f"level {lvl!r}: use PATIENT, STUDY, SERIES or IMAGE", EXIT_USAGE)
    asks = [e for e in ds if e.tag != 0x00080052 and (e.VR == "SQ" or e.value in (None, ""))]
    if not asks:  # nothing asked back, only matching keys: add the usual columns for the level
        for kw in DEFAULT_KEYS[lvl]:
            if kw not in ds:
                set_key(ds, kw)
    return ds, lvl


def cmd_find(args: argparse.Namespace) -> int:
    from node.scu import client as scu

    peer, options, _ = _setup(args)
    identifier, level = build_identifier(args.key or [], args.level)
    try:
        matches = scu.find(peer, identifier, model=args.model, options=options)
    except scu.PeerError as exc:
        raise _peer_failure(exc) from exc
    rows = [_ds_dict(m) for m in matches]
    if args.json:
        json.dump(rows, sys.stdout, indent=2, ensure_ascii=False)
        print()
        return 0
    columns = [e.keyword or f"{e.tag.group:04X},{e.tag.element:04X}" for e in identifier
               if e.tag not in (0x00080052, 0x00080005)]
    print(_table(rows, columns))
    print(f"{len(rows)} match(es) at {level} level from {peer}", file=sys.stderr)
    return 0


# --------------------------------------------------------------------------- fetch


def cmd_fetch(args: argparse.Namespace) -> int:
    from node.scu import client as scu

    if bool(args.move_to) == bool(args.get):
        raise CliError("choose --move-to AE (C-MOVE) or --get (C-GET)", EXIT_USAGE)
    if args.listen and not args.move_to:
        raise CliError("--listen is for --move-to (receive the moved instances here)", EXIT_USAGE)
    peer, options, cfg = _setup(args)
    receive_tls = _receiver_tls(args, cfg)
    out = Path(args.output) if args.output else Path.cwd()
    try:
        result = scu.fetch(peer, args.uid, level=_level_arg(args), model=args.model, move_to=args.move_to, get=args.get,
                           out_dir=out, receive_port=args.listen, receive_bind=args.listen_address,
                           receive_tls=receive_tls, options=options)
    except LookupError as exc:
        raise CliError(str(exc), EXIT_NOT_FOUND) from exc
    except scu.PeerError as exc:
        raise _peer_failure(exc) from exc
    how = f"C-MOVE to {args.move_to}" if args.move_to else "C-GET"
    print(f"{peer}: {how}: {result.completed} completed, {result.warning} warning, {result.failed} failed "
          f"(status 0x{result.status:04X})")
    for uid in result.failed_uids:
        print(f"failed: {uid}", file=sys.stderr)
    for path in result.files:
        print(path)
    return 0 if result.ok else EXIT_PEER


# --------------------------------------------------------------------------- parser


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--to", required=True, metavar="AE@HOST:PORT",
                   help="the peer, e.g. ORTHANC@127.0.0.1:4242, or the AE title of a configured [[peers]] entry")
    p.add_argument("--aet", metavar="AE", help="our calling AE title (default: node.ae_title of the configuration)")
    p.add_argument("--timeout", type=float, default=30.0, metavar="S",
                   help="seconds to wait for the peer at each step (default 30)")
    p.add_argument("--retries", type=int, default=3, metavar="N",
                   help="retries on transient failures: peer down, rejected-transient, aborted (default 3)")
    p.add_argument("--retry-delay", type=float, default=0.5, metavar="S",
                   help="first wait between retries, doubled each time (default 0.5)")
    p.add_argument("--retry-max-delay", type=float, default=8.0, metavar="S", help="longest wait (default 8)")
    g = p.add_argument_group("DICOM TLS (BCP 195: TLS 1.2 or later, ECDHE with AEAD suites)",
                             "A --to naming a [[peers]] entry with tls = true uses TLS and the\n"
                             "configuration's [tls] files without --tls; the options below override them.\n"
                             "Any of them implies --tls. A failed handshake is not retried.")
    g.add_argument("--tls", action="store_true", help="connect with TLS")
    g.add_argument("--tls-ca", metavar="FILE",
                   help="CA certificates (PEM) that must have signed the peer's certificate (default: the system "
                   "trust store, or tls.ca_certificates for a configured peer)")
    g.add_argument("--tls-cert", metavar="FILE", help="our client certificate chain (PEM), for peers that require one")
    g.add_argument("--tls-key", metavar="FILE", help="its private key (PEM, unencrypted; default: in --tls-cert)")
    g.add_argument("--tls-no-hostname-check", action="store_true",
                   help="accept a trusted certificate that does not name the peer's host (the CA check stays)")


def register(sub: Any) -> None:
    fmt = argparse.RawDescriptionHelpFormatter

    p = sub.add_parser("echo", help="C-ECHO a DICOM peer", formatter_class=fmt,
                       description="Verify that a DICOM peer answers (C-ECHO), retrying while it is not up yet.")
    _common(p)
    p.set_defaults(func=cmd_echo)

    p = sub.add_parser("store", help="send DICOM files to a peer (C-STORE)", formatter_class=fmt,
                       description="Send DICOM files (C-STORE) in their own transfer syntax when the peer accepts "
                       "it, byte for byte; otherwise converted to one it accepts (decompressed when needed). Model "
                       "objects always go in Explicit VR Little Endian. Exit 6 if any file was not stored.",
                       epilog="example:\n  modelnode store ct/*.dcm --to ORTHANC@127.0.0.1:4242")
    p.add_argument("files", nargs="+", metavar="FILE", help="DICOM files (or directories with -r)")
    p.add_argument("-r", "--recursive", action="store_true", help="send every file under the directories given")
    _common(p)
    p.set_defaults(func=cmd_store)

    p = sub.add_parser("find", help="query a peer (C-FIND)", formatter_class=fmt,
                       description="Query a peer with C-FIND. Keys are findscu's: -k Keyword=value matches, "
                       "-k Keyword asks for the value back, -k Seq[0].Keyword=value matches inside a sequence. "
                       "Wildcards * and ?, ranges 20200101-20201231, UID lists with backslashes.",
                       epilog="examples:\n"
                       "  modelnode find --to MODELNODE@127.0.0.1:11112 --level SERIES -k Modality=CT \\\n"
                       "      -k BodyPartExamined=CHEST -k SeriesDescription\n"
                       "  modelnode find --to MODELNODE@127.0.0.1:11112 --level SERIES -k SeriesDescription \\\n"
                       "      -k 'AcquisitionContextSequence[0].ConceptCodeSequence[0].CodeValue=39607008' --json")
    p.add_argument("-k", "--key", action="append", metavar="KEY[=VALUE]", help="a query key (repeatable)")
    p.add_argument("--level", type=str.upper, choices=["PATIENT", "STUDY", "SERIES", "IMAGE"],
                   help="QueryRetrieveLevel (default: from -k QueryRetrieveLevel=..., else STUDY)")
    p.add_argument("--model", choices=["study", "patient"], default="study",
                   help="information model: Study Root (default) or Patient Root")
    p.add_argument("--json", action="store_true", help="the matches as JSON (keyword: value)")
    _common(p)
    p.set_defaults(func=cmd_find)

    p = sub.add_parser("fetch", help="retrieve a model, instance, series or study (C-MOVE or C-GET)",
                       formatter_class=fmt,
                       description="Retrieve by UID. With --level auto the peer is asked first whether the UID "
                       "names an instance (a model's UID is its SOP Instance UID), a series or a study. "
                       "--get brings the instances here (C-GET, written to --output); --move-to sends them to an "
                       "AE the peer knows (C-MOVE), received here too with --listen PORT. Exit 6 unless every "
                       "sub-operation completed.",
                       epilog="examples:\n"
                       "  modelnode fetch 2.25.1234 --to MODELNODE@127.0.0.1:11112 --get -o models/\n"
                       "  modelnode fetch 1.2.3.4 --to PACS@10.0.0.5:104 --move-to MODELNODE")
    p.add_argument("uid", metavar="UID", help="SOP Instance, Series or Study Instance UID (PatientID at PATIENT)")
    p.add_argument("--move-to", metavar="AE", help="C-MOVE destination AE title")
    p.add_argument("--get", action="store_true", help="C-GET: receive the instances over the same association")
    p.add_argument("-o", "--output", metavar="DIR", help="where received files go (default: the current directory)")
    p.add_argument("--level", type=str.upper, default="AUTO", choices=["AUTO", "PATIENT", "STUDY", "SERIES", "IMAGE"],
                   help="what the UID names (default AUTO: ask the peer)")
    p.add_argument("--model", choices=["study", "patient"], default="study", help="information model (default study)")
    p.add_argument("--listen", type=int, metavar="PORT", help="with --move-to: receive the moved instances on PORT")
    p.add_argument("--listen-address", default="0.0.0.0", metavar="ADDR", help="address for --listen (default all)")
    p.add_argument("--listen-tls", action="store_true",
                   help="the --listen receiver speaks TLS, with --tls-cert/--tls-key (else tls.certificate and "
                   "tls.private_key); a client certificate the sender presents is verified against --tls-ca (else "
                   "tls.ca_certificates)")
    _common(p)
    p.set_defaults(func=cmd_fetch)


def _level_arg(args: argparse.Namespace) -> str:
    return "auto" if args.level == "AUTO" else args.level

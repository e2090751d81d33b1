"""``modelnode models``: pack, unpack, repair, add, list, show and remove model objects."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from iods import model_object
from iods.card import CardError, load_card
from node.cli.common import (
    EXIT_CONFLICT,
    EXIT_INVALID,
    EXIT_NOT_FOUND,
    EXIT_USAGE,
    CliError,
    config_from_args,
    progress_bar,
)


@contextmanager
def _refusals():
    """Turn the library's refusals into CLI errors with stable exit codes."""
    from node.storage.registry import ModelConflict

    try:
        yield
    except model_object.ModelObjectError as exc:
        raise CliError(f"refused [{exc.code}]: {exc}", EXIT_INVALID) from exc
    except CardError as exc:
        raise CliError(f"refused [invalid-card]: {exc}", EXIT_INVALID) from exc
    except ModelConflict as exc:
        raise CliError(f"refused [{exc.code}]: {exc}", EXIT_CONFLICT) from exc
    except FileNotFoundError as exc:
        raise CliError(f"no such file: {exc.filename}", EXIT_NOT_FOUND) from exc


def _existing(path: str) -> Path:
    p = Path(path)
    if not p.is_file():
        raise CliError(f"no such file: {p}", EXIT_NOT_FOUND)
    return p


def _max_payload(args: argparse.Namespace) -> int:
    if getattr(args, "max_payload", None):
        return args.max_payload
    return config_from_args(args).models.max_payload_bytes


def cmd_pack(args: argparse.Namespace) -> int:
    src = _existing(args.model)
    with _refusals():
        card = load_card(_existing(args.card))
        with progress_bar(src.stat().st_size, "packing") as progress:
            ds = model_object.pack_file(src, card, args.output, max_payload=_max_payload(args), progress=progress)
    print(f"packed {ds.SeriesDescription} as {ds.SOPInstanceUID} -> {args.output}")
    return 0


def cmd_unpack(args: argparse.Namespace) -> int:
    src = _existing(args.object)
    out = None if args.verify_only else Path(args.output or src.with_suffix(".onnx"))
    with _refusals(), progress_bar(src.stat().st_size, "verifying") as progress:
        card = model_object.unpack_file(src, out, max_payload=_max_payload(args), progress=progress)
    if args.card_out:
        Path(args.card_out).write_text(json.dumps(card.to_dict(), indent=2) + "\n", encoding="utf-8")
    what = f"-> {out}" if out else "(verified, nothing written)"
    print(f"{card.identity.name} {card.identity.version} ({card.identity.uid}) {what}")
    return 0


def cmd_repair(args: argparse.Namespace) -> int:
    src = _existing(args.object)
    # The payload passes twice: verified into a temporary file, then written from it.
    with _refusals(), progress_bar(2 * src.stat().st_size, "repairing") as progress:
        result = model_object.repair_file(
            src, args.output, max_payload=_max_payload(args), progress=progress
        )
    card = result.card
    what = f"{card.identity.name} {card.identity.version} ({result.uid})"
    if result.was_conformant:
        print(f"{what} already conformant, nothing to repair -> {args.output}")
    else:
        print(f"{what} repaired ({'; '.join(result.changes)}) -> {args.output}")
    return 0


def _open_app(args: argparse.Namespace):
    from node.app import open_app

    return open_app(config_from_args(args))


def cmd_add(args: argparse.Namespace) -> int:
    if args.reference:
        return _add_reference(args)
    if not args.file:
        raise CliError("name a FILE.dcm or MODEL.onnx, or --reference for the shipped reference models", EXIT_USAGE)
    src = _existing(args.file)
    app = _open_app(args)
    try:
        with _refusals():
            if src.suffix.lower() == ".onnx":
                if not args.card:
                    raise CliError("adding an .onnx file needs --card CARD.toml", EXIT_INVALID)
                card = load_card(_existing(args.card))
                with tempfile.TemporaryDirectory(dir=app.store.tmp) as tmp:
                    packed = Path(tmp) / "model.dcm"
                    with progress_bar(src.stat().st_size, "packing") as progress:
                        model_object.pack_file(src, card, packed, max_payload=app.registry.max_payload, progress=progress)
                    record, new = _add_object(app, packed)
            else:
                if args.card:
                    raise CliError("--card is only for .onnx files; a model object carries its own card", EXIT_INVALID)
                record, new = _add_object(app, src)
    finally:
        app.close()
    state = "added" if new else "already present, unchanged"
    print(f"{record.name} {record.version} ({record.uid}) {state}")
    return 0


def _add_reference(args: argparse.Namespace) -> int:
    """Register the reference models shipped in the package, whatever the registry holds.

    ``modelnode serve`` registers them only on a new registry, so an upgraded node does not get a
    reference model added in a later release: this is how an administrator asks for them.
    """
    from node.storage.registry import REFERENCE_SOURCE, reference_model_files

    if args.file or args.card:
        raise CliError("--reference takes no FILE or --card: it adds the models shipped with modelnode", EXIT_USAGE)
    files = reference_model_files()
    if not files:
        raise CliError("this installation ships no reference models", EXIT_NOT_FOUND)
    app = _open_app(args)
    try:
        with _refusals():
            for path in files:
                with progress_bar(path.stat().st_size, f"verifying {path.name}") as progress:
                    record, new = app.registry.add_file(path, source=REFERENCE_SOURCE, progress=progress)
                print(f"{record.name} {record.version} ({record.uid}) {'added' if new else 'already present, unchanged'}")
    finally:
        app.close()
    return 0


def _add_object(app, path: Path):
    with progress_bar(path.stat().st_size, "verifying") as progress:
        return app.registry.add_file(path, source="cli", progress=progress)


def _table(rows: list[list[str]], headers: list[str]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(out)


def cmd_list(args: argparse.Namespace) -> int:
    from node.storage.registry import Filters, record_summary

    app = _open_app(args)
    try:
        records = app.registry.list(
            Filters(name=args.name or "", modality=args.modality or "", body_part=args.body_part or "",
                    anatomy=args.anatomy or "", finding=args.finding or "", task=args.task or "",
                    version=args.version or "")
        )
        if args.json:
            json.dump([record_summary(r) for r in records], sys.stdout, indent=2)
            print()
        else:
            rows = []
            for r in records:
                s = record_summary(r)
                rows.append([r.name, r.version, r.task, ",".join(s["modalities"]), ",".join(s["body_parts"]),
                             _size(r.payload_length), r.uid])
            print(_table(rows, ["NAME", "VERSION", "TASK", "MODALITY", "BODY PART", "SIZE", "UID"]))
    finally:
        app.close()
    return 0


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def cmd_show(args: argparse.Namespace) -> int:
    from node.storage.registry import record_summary

    app = _open_app(args)
    try:
        record = app.registry.get(args.uid)
        if record is None:
            raise CliError(f"no model with UID {args.uid} in the registry", EXIT_NOT_FOUND)
        summary = record_summary(record)
        summary["file"] = str(app.registry.path(record))
        children = [r.uid for r in app.registry.list() if r.parent_uid == record.uid]
        summary["children"] = children
        from node.review.verdicts import model_counts

        summary["verdicts"] = model_counts(record.uid)
    finally:
        app.close()
    if args.json:
        json.dump(summary, sys.stdout, indent=2)
        print()
        return 0
    card = summary.pop("card")
    for key, value in summary.items():
        if isinstance(value, list):
            value = ", ".join(value) or "-"
        elif isinstance(value, dict):
            value = ", ".join(f"{k} {v}" for k, v in value.items() if v is not None) or "-"
        print(f"{key:>15}: {value if value != '' else '-'}")
    print(f"{'card':>15}:")
    print(_indent(json.dumps(card, indent=2)))
    return 0


def _indent(text: str) -> str:
    return "\n".join("    " + line for line in text.splitlines())


def cmd_remove(args: argparse.Namespace) -> int:
    app = _open_app(args)
    try:
        record = app.registry.remove(args.uid)
    finally:
        app.close()
    if record is None:
        raise CliError(f"no model with UID {args.uid} in the registry", EXIT_NOT_FOUND)
    print(f"removed {record.name} {record.version} ({record.uid})")
    return 0


def _bytes(text: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    t = text.strip().lower().rstrip("ib").rstrip("b")
    if t and t[-1] in units:
        return int(float(t[:-1]) * units[t[-1]])
    return int(t)


def register(sub: Any) -> None:
    fmt = argparse.RawDescriptionHelpFormatter
    p = sub.add_parser("models", help="pack, verify and manage model objects", formatter_class=fmt,
                       description="Model objects: ONNX models with their model card, as DICOM Raw Data instances.")
    msub = p.add_subparsers(dest="models_command", metavar="ACTION")
    msub.required = True

    def add(name: str, func: Callable[[argparse.Namespace], int], help_: str, desc: str) -> argparse.ArgumentParser:
        sp = msub.add_parser(name, help=help_, description=desc, formatter_class=fmt)
        sp.set_defaults(func=func)
        return sp

    sp = add("pack", cmd_pack, "pack MODEL.onnx and its card into a DICOM model object",
             "Validate the card, check the ONNX graph against it, and write a Raw Data Storage model object "
             "(Explicit VR Little Endian). The weights are streamed, never held twice in memory.")
    sp.add_argument("model", metavar="MODEL.onnx")
    sp.add_argument("--card", required=True, metavar="CARD.toml", help="the model card (TOML or JSON)")
    sp.add_argument("-o", "--output", required=True, metavar="MODEL.dcm")
    sp.add_argument("--max-payload", type=_bytes, metavar="SIZE", help="refuse payloads larger than SIZE (e.g. 512M)")

    sp = add("unpack", cmd_unpack, "verify a model object and extract its ONNX model",
             "Check length, SHA-256, onnx.checker and the graph signature against the card, then write the ONNX "
             "file. Nothing is written if any check fails.")
    sp.add_argument("object", metavar="MODEL.dcm")
    sp.add_argument("-o", "--output", metavar="MODEL.onnx", help="default: MODEL.dcm with .onnx suffix")
    sp.add_argument("--card-out", metavar="CARD.json", help="also write the card as JSON")
    sp.add_argument("--verify-only", action="store_true", help="verify, write nothing")
    sp.add_argument("--max-payload", type=_bytes, metavar="SIZE")

    sp = add("repair", cmd_repair, "rewrite a 0.1.0 model object with an even-length payload",
             "Verify a model object as unpack does, then write it again with the ONNX payload "
             "padded to an even value length (0.1.0 wrote odd lengths, which dcmtk and "
             "dicom3tools refuse), the same SOP Instance UID and every other attribute unchanged. "
             "An object that needs no repair is written as it is. The output appears only when "
             "complete.")
    sp.add_argument("object", metavar="OLD.dcm")
    sp.add_argument("-o", "--output", required=True, metavar="NEW.dcm")
    sp.add_argument("--max-payload", type=_bytes, metavar="SIZE")

    sp = add("add", cmd_add, "add a model object (or an ONNX file with --card) to the local registry",
             "Verify and register a model in the node's registry (the data directory of the configuration). "
             "Adding the same model twice is a no-op; the same UID with other content is refused (exit 5).")
    sp.add_argument("file", metavar="FILE.dcm|MODEL.onnx", nargs="?")
    sp.add_argument("--card", metavar="CARD.toml", help="card for an .onnx file")
    sp.add_argument("--reference", action="store_true",
                    help="add the reference models shipped with modelnode (serve adds them only to a new registry)")

    sp = add("list", cmd_list, "list registered models", "List registered models; filters combine with AND.")
    sp.add_argument("--name", help="name contains (or glob with *)")
    sp.add_argument("--modality", help="target modality, e.g. CT")
    sp.add_argument("--body-part", help="PS3.16 BodyPartExamined term, e.g. CHEST")
    sp.add_argument("--anatomy", metavar="SCT", help="SNOMED CT anatomy code, e.g. 39607008")
    sp.add_argument("--finding", metavar="SCT", help="SNOMED CT finding code")
    sp.add_argument("--task", choices=["segmentation", "classification"])
    sp.add_argument("--version")
    sp.add_argument("--json", action="store_true", help="machine-readable output")

    sp = add("show", cmd_show, "show one model, its card and its lineage", "Show a registered model by UID.")
    sp.add_argument("uid", metavar="UID")
    sp.add_argument("--json", action="store_true")

    sp = add("remove", cmd_remove, "remove a model from the registry", "Remove a model and its file by UID.")
    sp.add_argument("uid", metavar="UID")

    from node.cli import learning

    learning.register(msub)

"""``modelnode select``: rank the registered models for files, a directory or a stored study."""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import pydicom
from pydicom.errors import InvalidDicomError

from node.cli.common import EXIT_NOT_FOUND, CliError, config_from_args


def _read_headers(paths: list[Path]) -> list[pydicom.Dataset]:
    out = []
    for p in paths:
        try:
            out.append(pydicom.dcmread(p, stop_before_pixels=False, defer_size="64 KB"))
        except (InvalidDicomError, OSError, EOFError):
            continue  # not DICOM: a directory may hold anything
    return out


def _gather(targets: list[str], app) -> list[pydicom.Dataset]:
    from node.storage import index

    datasets: list[pydicom.Dataset] = []
    for t in targets:
        p = Path(t)
        if p.is_dir():
            datasets += _read_headers(sorted(f for f in p.rglob("*") if f.is_file()))
        elif p.is_file():
            datasets += _read_headers([p])
        else:
            # A StudyInstanceUID (or SeriesInstanceUID) stored on the node.
            rows = list(index.Instance.select().join(index.Series).join(index.Study)
                        .where((index.Study.study_uid == t) | (index.Series.series_uid == t))
                        .where(index.Series.is_model == False))  # noqa: E712 (peewee expression)
            if not rows:
                raise CliError(f"{t} is neither a file, a directory nor a study/series stored on this node", EXIT_NOT_FOUND)
            datasets += _read_headers([app.store.path(r.digest) for r in rows])
    if not datasets:
        raise CliError("no DICOM instances found in " + ", ".join(targets), EXIT_NOT_FOUND)
    return datasets


def cmd_select(args: argparse.Namespace) -> int:
    from iods.anatomy import AnatomyNormaliser
    from node.app import open_app
    from node.pipeline.selection import SeriesFacts, select

    cfg = config_from_args(args)
    app = open_app(cfg)
    try:
        datasets = _gather(args.paths, app)
        models = [(r.uid, r.card) for r in app.registry.all_with_terms()]
        onnx_of = {r.uid: app.registry.path(r) for r in app.registry.all_with_terms()} if args.image_check else {}
    finally:
        app.close()
    normaliser = AnatomyNormaliser(extra_synonyms=cfg.anatomy.synonyms)
    sessions = None
    if args.image_check:
        from iods import model_object
        from models.runtime import RuntimeSettings, SessionCache

        sessions = SessionCache(RuntimeSettings(providers=tuple(cfg.inference.providers)))

        def load(uid: str):
            payload, _ = model_object.decode(model_object.read_file(onnx_of[uid]))
            return sessions.get(uid, payload)
    groups: dict[str, list[pydicom.Dataset]] = defaultdict(list)
    for ds in datasets:
        groups[str(ds.get("SeriesInstanceUID", "?"))].append(ds)
    results: list[dict[str, Any]] = []
    for series_uid in sorted(groups):
        series = groups[series_uid]
        readings, seen = [], []
        if sessions is not None:
            from models.image_check import as_anatomy, image_readings

            readings = image_readings(series, models, load, normaliser)
            seen = as_anatomy(readings)
        facts = SeriesFacts.from_datasets(series, normaliser=normaliser, called_ae=args.called_ae or "",
                                          findings=args.finding or [], image_anatomy=seen,
                                          image_readings=readings, settings=cfg.selection)
        sel = select(facts, models, cfg.selection, normaliser=normaliser)
        results.append({"series_uid": series_uid, "instances": len(series), "selection": sel})
    if args.json:
        json.dump([{"series_uid": r["series_uid"], "instances": r["instances"], **r["selection"].to_dict()}
                   for r in results], sys.stdout, indent=2)
        print()
    else:
        for r in results:
            sel = r["selection"]
            first = groups[r["series_uid"]][0]
            print(f"series {r['series_uid']}  {first.get('Modality', '')}  {first.get('SeriesDescription', '')!s}  "
                  f"({r['instances']} instance(s))")
            print("  anatomy: " + ("; ".join(sel.facts.summary()["anatomy"]) or "none found"))
            for line in sel.explain().splitlines():
                print("  " + line)
            print()
    return 0 if all(r["selection"].suitable for r in results) or not args.fail_if_none else 4


def register(sub: Any) -> None:
    p = sub.add_parser(
        "select", help="rank the registered models for DICOM files, a directory or a stored study",
        description="Rank the models in the registry for each series found, with the reason for every "
                    "score and rejection. PATH is a file, a directory (searched recursively) or the "
                    "StudyInstanceUID/SeriesInstanceUID of a study stored on this node.",
    )
    p.add_argument("paths", nargs="+", metavar="PATH")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--called-ae", metavar="AE", help="rank as if the study was sent to this AE title (site rules)")
    p.add_argument("--finding", action="append", metavar="SCT", help="SNOMED CT finding the request names (repeatable)")
    p.add_argument("--image-check", action="store_true",
                   help="also run a registered body-part classifier on radiographs (as the pipeline does)")
    p.add_argument("--fail-if-none", action="store_true", help="exit 4 when a series has no suitable model")
    p.set_defaults(func=cmd_select)

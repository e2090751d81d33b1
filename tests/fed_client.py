"""Flower client processes for tests/test_federated_failures.py (run as a script, not imported
by the node).

    python tests/fed_client.py honest ADDRESS OUTDIR [--ca PEM] [--wait SECONDS]
    python tests/fed_client.py die    ADDRESS OUTDIR [--ca PEM] [--wait SECONDS]

``honest`` is the node's own client (models.training.federated.NodeClient) on two tiny phantom
series (2 slices of 128x128): it trains as ``federate join`` does and writes, per round, the
SHA-256 of the weights it received (``recv-ROUND``) and of those it returned (``sent-ROUND``),
so the test can check exactly what the server aggregated. ``die`` is a bare flwr NumPyClient
that connects, writes ``fit`` when the server asks it to train and then ends its process with
``os._exit(1)``: a site that crashes or loses its link mid-round. Neither writes ``fit`` unless
the server actually reached it, which is how the TLS test sees that a client was refused.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import flwr as fl
import numpy as np

REPO = Path(__file__).resolve().parent.parent
LUNG = REPO / "models" / "reference" / "lung_unet.dcm"
HONEST = "HONEST:1"


def digest(arrays: Sequence[np.ndarray]) -> str:
    """SHA-256 over each array's dtype, shape and bytes, in order: equal only if bit-identical."""
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


class Dying(fl.client.NumPyClient):
    def __init__(self, out: Path) -> None:
        self.out = out

    def get_parameters(self, config):  # type: ignore[no-untyped-def]
        return []

    def fit(self, parameters, config):  # type: ignore[no-untyped-def]
        (self.out / "fit").write_text(str(config.get("round")))
        os._exit(1)  # no goodbye to the server: the process is simply gone

    def evaluate(self, parameters, config):  # type: ignore[no-untyped-def]
        return 0.0, 1, {}


def _honest(out: Path):  # type: ignore[no-untyped-def]
    import pydicom

    from iods import model_object
    from models.training import federated
    from models.training import finetune as ft
    from models.training.phantoms import ct_truth, write_ct_series

    def case(seed: int) -> ft.Case:
        paths = write_ct_series(out / str(seed), seed, slices=2, size=128)
        truth = ct_truth(seed, slices=2, size=128)
        labels = {u: np.stack([truth.lung[i], truth.nodule[i]], -1) for i, u in enumerate(truth.sop_instance_uids)}
        return ft.Case(str(seed), [pydicom.dcmread(p) for p in paths], labels)

    class Honest(federated.NodeClient):
        def fit(self, parameters, config):  # type: ignore[no-untyped-def]
            r = config.get("round")
            (out / f"recv-{r}").write_text(digest(parameters))
            weights, n, metrics = super().fit(parameters, config)
            (out / f"sent-{r}").write_text(digest(weights))
            (out / "fit").write_text(str(r))
            return weights, n, metrics

    onnx_bytes, card = model_object.decode(pydicom.dcmread(LUNG))
    return federated, Honest(HONEST, card, onnx_bytes, [case(8801)], [case(8802)])


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("role", choices=("honest", "die"))
    ap.add_argument("address")
    ap.add_argument("out", type=Path)
    ap.add_argument("--ca", type=Path)
    ap.add_argument("--wait", type=float)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    ca = args.ca.read_bytes() if args.ca else None
    if args.role == "honest":
        federated, client = _honest(args.out)
        federated.join(args.address, client, root_certificates=ca, max_wait_time=args.wait)
    else:
        # No torch here: the same transport call as models.training.federated.join.
        fl.client.start_client(server_address=args.address, client=Dying(args.out).to_client(),
                               root_certificates=ca, max_wait_time=args.wait)
    (args.out / "done").write_text("")
    return 0


if __name__ == "__main__":
    sys.exit(main())

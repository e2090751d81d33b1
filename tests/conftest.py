from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from cards import segmentation_card_dict  # noqa: E402
from onnx_factory import segmentation_model  # noqa: E402


@pytest.fixture
def seg_onnx() -> bytes:
    return segmentation_model()


@pytest.fixture
def seg_card():
    from iods.card import parse_card

    return parse_card(segmentation_card_dict())


@pytest.fixture
def app(tmp_path, monkeypatch):
    """The node's state (database, store, registry) in a fresh data directory."""
    from node.app import open_app
    from node.config import parse_config

    cfg = parse_config({"storage": {"data_dir": str(tmp_path / "data")}})
    a = open_app(cfg)
    yield a
    a.close()

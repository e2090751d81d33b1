"""The model card schema: valid cards load, invalid ones name the offending field."""

from __future__ import annotations

import copy

import pytest
from cards import segmentation_card_dict

from iods.card import SCHEMA, CardError, card_from_json, load_card, parse_card


@pytest.mark.timeout(10)
def test_valid_card_round_trips_through_json():
    card = parse_card(segmentation_card_dict())
    assert card.schema == SCHEMA
    assert card.target.modalities == ("CT",)
    assert [c.label for c in card.task.classes] == ["lung", "nodule"]
    assert card.input.size == (None, None)  # 0 means a dynamic axis
    assert card.input.preprocessing.window.width == 1500
    again = card_from_json(card.to_json())
    assert again == card


def _without(path: str) -> dict:
    data = copy.deepcopy(segmentation_card_dict())
    *parents, last = path.split(".")
    node = data
    for p in parents:
        node = node[int(p)] if p.isdigit() else node[p]
    del node[last]
    return data


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    "path",
    ["identity.name", "identity.version", "identity.manufacturer", "identity.licence", "identity.intended_use",
     "identity.created", "target.modalities", "target.anatomy", "task.type", "task.classes", "input.layout",
     "input.channels", "input.size"],
)
def test_missing_required_field_is_named(path):
    with pytest.raises(CardError) as err:
        parse_card(_without(path))
    assert err.value.field == path
    assert path in str(err.value)


@pytest.mark.timeout(10)
def test_missing_field_inside_a_class_is_named_with_its_index():
    data = segmentation_card_dict()
    del data["task"]["classes"][1]["category"]
    with pytest.raises(CardError) as err:
        parse_card(data)
    assert err.value.field == "task.classes[1].category"


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda d: d["target"].__setitem__("modalities", ["XX"]), "target.modalities[0]"),
        (lambda d: d["target"].__setitem__("body_parts", ["chest!"]), "target.body_parts[0]"),
        (lambda d: d["target"]["anatomy"][0].__setitem__("value", "lung"), "target.anatomy[0].value"),
        (lambda d: d["task"].__setitem__("type", "detection"), "task.type"),
        (lambda d: d["task"]["classes"][0].__setitem__("threshold", 1.5), "task.classes[0].threshold"),
        (lambda d: d["task"]["classes"][1].__setitem__("label", "lung"), "task.classes[1].label"),
        (lambda d: d["input"].__setitem__("channels", "one"), "input.channels"),
        (lambda d: d["input"].__setitem__("size", [128]), "input.size"),
        (lambda d: d["input"]["preprocessing"]["window"].__setitem__("width", -1), "input.preprocessing.window.width"),
        (lambda d: d["identity"].__setitem__("uid", "1.2.abc"), "identity.uid"),
        (lambda d: d["identity"].__setitem__("created", "yesterday"), "identity.created"),
        (lambda d: d["provenance"].__setitem__("parent_uid", "not a uid"), "provenance.parent_uid"),
        (lambda d: d["identity"].__setitem__("colour", "blue"), "identity.colour"),
        (lambda d: d.__setitem__("schema", "modelnode.card/9"), "schema"),
    ],
)
def test_invalid_values_are_refused_by_field(mutate, field):
    data = segmentation_card_dict()
    mutate(data)
    with pytest.raises(CardError) as err:
        parse_card(data)
    assert err.value.field == field


@pytest.mark.timeout(10)
def test_load_card_from_toml_file(tmp_path):
    from cards import SEGMENTATION_TOML

    p = tmp_path / "card.toml"
    p.write_text(SEGMENTATION_TOML)
    assert load_card(p).identity.name == "test-lung-seg"
    p.write_text("[identity\nname=")
    with pytest.raises(CardError, match="not valid TOML"):
        load_card(p)


# --------------------------------------------------------------------------- volumetric keys


def test_the_monai_example_in_the_docs_parses():
    """docs/model-object.md's complete MONAI card is a valid card with the meaning it claims."""
    import re
    import tomllib
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "docs" / "model-object.md").read_text()
    block = re.search(r"```toml\n(schema = .*?)```", text, re.S).group(1)
    card = parse_card(tomllib.loads(block))
    assert card.task.exclusive and card.task.output == "logits" and card.output_count == 3
    assert card.input.orientation == "RAS" and card.input.size_divisor == (16, 16, 16)
    assert card.input.sliding_window.size == (96, 96, 96) and card.input.sliding_window.blending == "gaussian"
    assert card.input.preprocessing.resample_spacing == (1.5, 1.5, 2.0)


def _volume(**changes):
    from cards import volume_card_dict

    d = volume_card_dict()
    for path, value in changes.items():
        *parents, leaf = path.split(".")
        node = d
        for p in parents:
            node = node.setdefault(p, {})
        if value is None:
            node.pop(leaf, None)
        else:
            node[leaf] = value
    return d


def test_cards_without_the_new_keys_keep_their_meaning():
    card = parse_card(segmentation_card_dict())
    assert not card.task.exclusive and card.task.output == "probabilities" and card.task.activation == "sigmoid"
    assert card.input.orientation == "" and card.input.sliding_window is None and card.input.size_divisor is None
    assert card.output_count == len(card.task.classes)


@pytest.mark.parametrize("path,value,field,reason", [
    ("task.activation", "sigmoid", "task.activation", "exclusive classes take softmax"),
    ("input.orientation", "RAX", "input.orientation", "three axis codes"),
    ("input.orientation", "RRS", "input.orientation", "three axis codes"),
    ("input.size_divisor", [16, 16], "input.size_divisor", "3 of them"),
    ("input.size_divisor", 0, "input.size_divisor", "positive"),
    ("input.sliding_window.size", [96, 96], "input.sliding_window.size", "3 spatial sizes"),
    ("input.sliding_window.overlap", 1.0, "input.sliding_window.overlap", r"\[0, 1\)"),
    ("input.sliding_window.blending", "hann", "input.sliding_window.blending", "must be one of"),
    ("input.sliding_window.batch", 0, "input.sliding_window.batch", "at least 1"),
    ("input.sliding_window.colour", 1, "input.sliding_window.colour", "not a field"),
    ("task.output", "scores", "task.output", "must be one of"),
])
def test_volumetric_keys_are_validated(path, value, field, reason):
    with pytest.raises(CardError, match=reason) as err:
        parse_card(_volume(**{path: value}))
    assert err.value.field == field


def test_window_must_fit_the_graph_and_the_divisor():
    with pytest.raises(CardError, match="multiple of input.size_divisor 16"):
        parse_card(_volume(**{"input.size_divisor": 16, "input.sliding_window.size": [40, 32, 32]}))
    with pytest.raises(CardError, match="fixed at 32"):
        parse_card(_volume(**{"input.size": [32, 32, 32], "input.sliding_window.size": [64, 32, 32]}))
    # A fixed input size is the window when the window gives none.
    card = parse_card(_volume(**{"input.size": [32, 32, 32], "input.sliding_window.size": None}))
    assert card.input.sliding_window.size == (32, 32, 32)
    with pytest.raises(CardError, match="sliding_window.size"):
        parse_card(_volume(**{"input.sliding_window.size": None}))  # dynamic graph, no window size
    with pytest.raises(CardError, match="applies to 3d inputs only"):
        d = segmentation_card_dict()
        d["input"]["orientation"] = "RAS"
        parse_card(d)


def test_exclusive_output_channels_are_checked_against_the_graph():
    from onnx_factory import intensity_classes_model

    from iods.model_object import ShapeMismatch, _verify_onnx

    card = parse_card(_volume())
    _verify_onnx(intensity_classes_model(), card)  # 4 channels = background + 3 classes
    d = _volume()
    d["task"]["classes"] = d["task"]["classes"][:2]
    with pytest.raises(ShapeMismatch, match="4 channels, card has 2 exclusive classes \\+ background"):
        _verify_onnx(intensity_classes_model(), parse_card(d))

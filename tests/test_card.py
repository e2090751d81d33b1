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

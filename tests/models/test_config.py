import json

import pytest

from edgevlm.models import PRESETS, MedVLMConfig


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_round_trip_through_json(name):
    cfg = PRESETS[name]()
    again = MedVLMConfig.from_json(cfg.to_json())
    assert again == cfg
    assert json.loads(again.to_json()) == json.loads(cfg.to_json())


def test_decisions_round_trip_through_json(tiny_cfg):
    # JSON has no tuples: (token, threshold) pairs come back as lists and are normalized on load.
    tiny_cfg.prompt.decisions = {"Lung mass:": (" none", 0.47), "Emphysema:": (" none", 0.5)}
    again = MedVLMConfig.from_json(tiny_cfg.to_json())
    assert again == tiny_cfg and again.prompt.decisions["Lung mass:"] == (" none", 0.47)


def test_derived_fields(tiny_cfg):
    assert tiny_cfg.vision.grid == (4, 4, 4)
    assert tiny_cfg.vision.num_patches == 64
    assert tiny_cfg.num_visual_tokens == 8
    assert tiny_cfg.decoder.head_dim == 12


def test_m3d_shapes_expressible():
    cfg = PRESETS["m3d-lamed-phi3"]()
    assert cfg.vision.grid == (8, 16, 16)
    assert cfg.vision.patch_dim == 1024
    assert cfg.num_visual_tokens == 256
    assert cfg.decoder.vocab_size == 32015


def test_unknown_fields_are_rejected(tiny_cfg):
    data = tiny_cfg.to_dict()
    data["vision"]["patch_sizee"] = [1, 2, 3]
    with pytest.raises(ValueError, match="patch_sizee"):
        MedVLMConfig.from_dict(data)


def test_bad_geometry_is_rejected(tiny_cfg):
    data = tiny_cfg.to_dict()
    data["vision"]["image_size"] = [9, 16, 16]
    with pytest.raises(ValueError, match="not a multiple"):
        MedVLMConfig.from_dict(data)

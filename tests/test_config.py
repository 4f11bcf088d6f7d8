import json
import re

import pytest
from transformers import AutoConfig

from mae_hf import MAEConfig, MAEForPreTraining


def test_defaults_are_the_reference_model():
    config = MAEConfig()
    expected = dict(
        image_size=32, patch_size=2, num_channels=3, hidden_size=192, num_hidden_layers=12, num_attention_heads=3,
        mlp_ratio=4.0, decoder_hidden_size=192, decoder_num_hidden_layers=4, decoder_num_attention_heads=3,
        mask_ratio=0.75, norm_pix_loss=False, pooling="cls", linear_probe=False,
    )
    assert {key: getattr(config, key) for key in expected} == expected
    assert config.num_patches == 256
    assert config.intermediate_size == 768


def test_reference_model_has_about_7_2m_parameters():
    num_params = sum(p.numel() for p in MAEForPreTraining(MAEConfig()).parameters())
    assert 7.1e6 < num_params < 7.25e6


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(image_size=10, patch_size=4), "image_size"),
        (dict(hidden_size=24, num_attention_heads=5), "hidden_size"),
        (dict(decoder_hidden_size=24, decoder_num_attention_heads=5), "decoder_hidden_size"),
        (dict(mask_ratio=1.0), "mask_ratio"),
        (dict(mask_ratio=-0.1), "mask_ratio"),
        (dict(mask_ratio=0.99), "mask_ratio"),  # int(16 * 0.01) = 0 visible patches
        (dict(pooling="max"), "pooling"),
        (dict(hidden_act="not_an_activation"), "hidden_act"),
    ],
)
def test_impossible_config_raises_naming_the_field(tiny_config, overrides, field):
    # The field name must appear as a whole word: "decoder_hidden_size" does not count as naming "hidden_size".
    with pytest.raises(ValueError, match=rf"(?<!\w){re.escape(field)}(?!\w)"):
        tiny_config(**overrides)


def test_save_load_round_trip(tmp_path, tiny_config):
    config = tiny_config(norm_pix_loss=True, pooling="mean", linear_probe=True, mask_ratio=0.5,
                         image_mean=[0.5, 0.4, 0.3], image_std=[0.2, 0.25, 0.3], num_labels=3,
                         id2label={0: "cat", 1: "dog", 2: "ship"})
    config.save_pretrained(tmp_path)
    loaded = MAEConfig.from_pretrained(tmp_path)
    assert loaded.to_dict() == config.to_dict()
    assert loaded.image_mean == [0.5, 0.4, 0.3] and loaded.pooling == "mean" and loaded.mask_ratio == 0.5
    assert loaded.id2label == {0: "cat", 1: "dog", 2: "ship"}
    assert type(AutoConfig.from_pretrained(tmp_path)) is MAEConfig


def test_model_type():
    assert MAEConfig.model_type == "mae_hf"
    assert MAEConfig().to_dict()["model_type"] == "mae_hf"


def test_auto_map_names_all_three_model_classes(tmp_path, tiny_config):
    expected = {
        "AutoConfig": "configuration_mae.MAEConfig",
        "AutoModel": "modeling_mae.MAEModel",
        "AutoModelForPreTraining": "modeling_mae.MAEForPreTraining",
        "AutoModelForImageClassification": "modeling_mae.MAEForImageClassification",
    }
    assert MAEConfig().auto_map == expected
    tiny_config().save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["auto_map"] == expected  # on disk, not re-filled

"""Parity with transformers' ViTMAE, both directions, and the scripts/convert.py command line."""

import importlib.util
import json

import pytest
import torch
from transformers import ViTMAEForPreTraining

from mae_hf import MAEForPreTraining, sincos_position_embedding
from mae_hf.convert import config_to_vit_mae, from_vit_mae, to_vit_mae

# Decoder narrower than the encoder and a non-default MLP ratio, so that swapped or misread sizes cannot match.
OVERRIDES = dict(decoder_hidden_size=8, mlp_ratio=2.0, decoder_num_hidden_layers=2)
POSITION_TABLES = ("vit.embeddings.position_embeddings", "decoder.decoder_pos_embed")


def assert_same_function(ours, theirs, pixel_values, noise):
    ours.eval(), theirs.eval()
    with torch.no_grad():
        a, b = ours(pixel_values, noise=noise), theirs(pixel_values, noise=noise)
    torch.testing.assert_close(a.loss, b.loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a.logits, b.logits, rtol=1e-5, atol=1e-5)
    assert torch.equal(a.mask, b.mask)
    assert torch.equal(a.ids_restore, b.ids_restore)


def assert_same_state(a, b):
    a, b = a.state_dict(), b.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def sincos_vit_mae(config):
    """A ViTMAE built from a config, with the sin-cos tables it leaves at zero in transformers 5.x filled in."""
    theirs = ViTMAEForPreTraining(config_to_vit_mae(config))
    grid = config.image_size // config.patch_size
    with torch.no_grad():
        theirs.vit.embeddings.position_embeddings.copy_(sincos_position_embedding(grid, config.hidden_size))
        theirs.decoder.decoder_pos_embed.copy_(sincos_position_embedding(grid, config.decoder_hidden_size))
    return theirs


@pytest.mark.parametrize("norm_pix_loss", [False, True])
def test_to_vit_mae_parity(tiny_config, perturb, pixel_values, noise, norm_pix_loss):
    ours = perturb(MAEForPreTraining(tiny_config(norm_pix_loss=norm_pix_loss, **OVERRIDES)))
    theirs = to_vit_mae(ours)
    assert isinstance(theirs, ViTMAEForPreTraining) and theirs.config.norm_pix_loss is norm_pix_loss
    assert_same_function(ours, theirs, pixel_values, noise)
    assert torch.equal(ours.patchify(pixel_values), theirs.patchify(pixel_values))
    assert_same_state(from_vit_mae(theirs), ours)


@pytest.mark.parametrize("norm_pix_loss", [False, True])
def test_from_vit_mae_parity(tiny_config, perturb, pixel_values, noise, norm_pix_loss):
    theirs = perturb(sincos_vit_mae(tiny_config(norm_pix_loss=norm_pix_loss, **OVERRIDES)), skip=POSITION_TABLES)
    ours = from_vit_mae(theirs)
    assert isinstance(ours, MAEForPreTraining) and ours.config.norm_pix_loss is norm_pix_loss
    assert ours.config.decoder_hidden_size == 8 and ours.config.intermediate_size == 32
    assert_same_function(ours, theirs, pixel_values, noise)


def test_from_vit_mae_refuses_non_sincos_position_tables(tiny_config):
    with pytest.raises(ValueError, match="sin-cos"):
        from_vit_mae(ViTMAEForPreTraining(config_to_vit_mae(tiny_config())))  # tables left at zero
    theirs = sincos_vit_mae(tiny_config())
    with torch.no_grad():
        theirs.decoder.decoder_pos_embed.add_(0.01)
    with pytest.raises(ValueError, match="decoder_pos_embed"):
        from_vit_mae(theirs)


def test_without_qkv_bias(tiny_config, perturb, pixel_values, noise):
    ours = perturb(MAEForPreTraining(tiny_config(qkv_bias=False)))
    assert ours.mae.layers[0].attention.qkv.bias is None
    theirs = to_vit_mae(ours)
    assert theirs.vit.layers[0].attention.q_proj.bias is None
    assert_same_function(ours, theirs, pixel_values, noise)
    back = from_vit_mae(theirs)
    assert back.config.qkv_bias is False
    assert_same_state(back, ours)


# ---------------------------------------------------------------- scripts/convert.py


@pytest.fixture(scope="module")
def convert_script(repo_root):
    spec = importlib.util.spec_from_file_location("convert_script", repo_root / "scripts" / "convert.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_script_round_trip(tmp_path, tiny_config, perturb, pixel_values, noise, convert_script):
    ours = perturb(MAEForPreTraining(tiny_config(image_mean=[0.5, 0.4, 0.3], image_std=[0.2, 0.25, 0.3])))
    ours.save_pretrained(tmp_path / "ours")

    convert_script.main([str(tmp_path / "ours"), str(tmp_path / "vit")])  # direction from model_type
    assert json.loads((tmp_path / "vit" / "config.json").read_text())["model_type"] == "vit_mae"
    processor = json.loads((tmp_path / "vit" / "preprocessor_config.json").read_text())
    assert processor["image_processor_type"].startswith("ViTImageProcessor")
    assert processor["image_mean"] == [0.5, 0.4, 0.3] and processor["size"] == {"height": 8, "width": 8}
    theirs = ViTMAEForPreTraining.from_pretrained(tmp_path / "vit")
    assert_same_function(ours, theirs, pixel_values, noise)

    convert_script.main([str(tmp_path / "vit"), str(tmp_path / "back"), "--to", "mae_hf"])
    back = MAEForPreTraining.from_pretrained(tmp_path / "back")
    assert back.config.image_mean == [0.5, 0.4, 0.3] and back.config.image_std == [0.2, 0.25, 0.3]
    assert (tmp_path / "back" / "modeling_mae.py").is_file()
    assert (tmp_path / "back" / "preprocessor_config.json").is_file()
    assert_same_state(back, ours)
    back.eval()
    with torch.no_grad():
        expected, actual = ours(pixel_values, noise=noise), back(pixel_values, noise=noise)
    assert torch.equal(expected.logits, actual.logits) and torch.equal(expected.loss, actual.loss)


def test_script_refusals(tmp_path, tiny_config, convert_script, capsys):
    from mae_hf.cli import run_script

    (tmp_path / "empty").mkdir()
    (tmp_path / "torn").mkdir()
    (tmp_path / "torn" / "config.json").write_text('{"model_type": "vit')
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text('{"model_type": "bert"}')
    for source, message in (("empty", "has no config.json"), ("torn", "is not valid JSON"),
                            ("bert", "neither 'vit_mae' nor 'mae_hf'")):  # a folder of the wrong kind: exit code 1
        with pytest.raises(SystemExit) as exit_:
            run_script(convert_script.main, [str(tmp_path / source), str(tmp_path / "out")])
        err = capsys.readouterr().err
        assert exit_.value.code == 1 and err.startswith("error: ") and message in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()

    MAEForPreTraining(tiny_config()).save_pretrained(tmp_path / "ours")
    with pytest.raises(SystemExit) as exit_:  # the command line contradicts the folder: a usage error
        convert_script.main([str(tmp_path / "ours"), str(tmp_path / "out"), "--to", "mae"])
    assert exit_.value.code == 2 and "already holds" in capsys.readouterr().err

    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(SystemExit):
        convert_script.main([str(tmp_path / "ours"), str(tmp_path / "full")])
    assert "--overwrite" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "full").iterdir()] == ["keep.txt"]

    for out in (tmp_path, tmp_path / "ours" / "vit"):  # OUT_DIR holding SRC_DIR, or inside it
        with pytest.raises(SystemExit) as exit_:
            convert_script.main([str(tmp_path / "ours"), str(out), "--overwrite"])
        assert exit_.value.code == 2 and "overlaps SRC_DIR" in capsys.readouterr().err
    assert not (tmp_path / "ours" / "vit").exists()

    convert_script.main([str(tmp_path / "ours"), str(tmp_path / "full"), "--overwrite"])
    assert (tmp_path / "full" / "model.safetensors").is_file()


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
@pytest.mark.parametrize("source", ["mae_hf", "vit_mae", "vit_mae_bin"])
def test_broken_weights_are_named_not_a_traceback(tmp_path, tiny_config, convert_script, capsys, source, damage):
    """A truncated or garbage model.safetensors (or an older folder's pytorch_model.bin) in SRC_DIR: one error line
    naming the file, exit code 1 (the command line is right, the file is not), nothing written."""
    from mae_hf.cli import run_script

    ours = MAEForPreTraining(tiny_config())
    folder = tmp_path / source
    if source == "mae_hf":
        ours.save_pretrained(folder)
    else:
        to_vit_mae(ours).save_pretrained(folder)
    weights = folder / "model.safetensors"
    if source == "vit_mae_bin":  # what older transformers wrote
        torch.save(ViTMAEForPreTraining.from_pretrained(folder).state_dict(), folder / "pytorch_model.bin")
        weights.unlink()
        weights = folder / "pytorch_model.bin"
    data = weights.read_bytes()
    weights.write_bytes({"truncated": data[:len(data) // 2], "empty": b"",
                         "garbage": bytes(range(256)) * (len(data) // 256)}[damage])
    capsys.readouterr()  # the saves' output above
    with pytest.raises(SystemExit) as exit_info:
        run_script(convert_script.main, [str(folder), str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error: {weights} is ") and "again" in lines[0], err
    assert not (tmp_path / "out").exists()


def test_bf16_and_ours_only_settings_survive_the_round_trip(tiny_config, perturb, pixel_values, noise):
    """A bf16 model converts both ways (its stored sin-cos tables are the rounded ones), and the settings ViTMAE has
    no field for (pooling, drop path, normalisation statistics) come back instead of the defaults."""
    ours = perturb(MAEForPreTraining(tiny_config(pooling="mean", drop_path_rate=0.1, image_mean=[0.1, 0.2, 0.3],
                                                 **OVERRIDES))).to(torch.bfloat16)
    back = from_vit_mae(to_vit_mae(ours))
    assert next(back.parameters()).dtype == torch.bfloat16
    assert_same_state(back, ours)
    for field in ("pooling", "drop_path_rate", "image_mean", "image_std"):
        assert getattr(back.config, field) == getattr(ours.config, field), field


def test_an_encoder_or_classifier_folder_is_refused(tmp_path, tiny_config, convert_script, capsys):
    """Without decoder weights the converted model's decoder would be random: refused, naming what the folder holds,
    before anything is written."""
    from mae_hf import MAEForImageClassification, MAEModel
    from mae_hf.cli import run_script

    for model_class in (MAEModel, MAEForImageClassification):
        folder = tmp_path / model_class.__name__
        model_class(tiny_config()).save_pretrained(folder)
        with pytest.raises(SystemExit) as exit_:
            run_script(convert_script.main, [str(folder), str(tmp_path / "out")])
        err = capsys.readouterr().err
        assert exit_.value.code == 1 and f"holds no decoder weights ({model_class.__name__})" in err, err
        assert not (tmp_path / "out").exists()

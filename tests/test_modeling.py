import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from mae_hf import (
    MAEForImageClassification,
    MAEForPreTraining,
    MAEModel,
    sincos_position_embedding,
)

N = 16  # patches in a tiny (8 px, patch 2) image
EXPECTED_SHAPE = "(batch, 3, 8, 8)"


def kept(num_patches, ratio):
    return int(num_patches * (1 - ratio))


# ---------------------------------------------------------------- shapes


def test_encoder_shapes_unmasked_and_deterministic(tiny_config, pixel_values):
    model = MAEModel(tiny_config()).eval()
    out = model(pixel_values, output_hidden_states=True)
    assert out.last_hidden_state.shape == (2, 1 + N, 16)
    assert out.pooler_output.shape == (2, 16)
    assert len(out.hidden_states) == 1 + 2
    assert torch.equal(out.mask, torch.zeros(2, N))
    assert torch.equal(out.ids_restore, torch.arange(N).expand(2, -1))
    again = model(pixel_values)
    assert torch.equal(out.last_hidden_state, again.last_hidden_state)
    assert torch.equal(out.pooler_output, again.pooler_output)


@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.7, 0.9])
def test_encoder_with_mask_ratio_keeps_exact_count(tiny_config, pixel_values, ratio):
    out = MAEModel(tiny_config())(pixel_values, mask_ratio=ratio)
    assert out.last_hidden_state.shape == (2, 1 + kept(N, ratio), 16)
    assert torch.equal(out.mask.sum(dim=1), torch.full((2,), float(N - kept(N, ratio))))


@pytest.mark.parametrize(
    "overrides, num_patches, patch_dim",
    [({}, 16, 12), (dict(patch_size=4, num_channels=1, image_mean=[0.5], image_std=[0.25]), 4, 16)],
)
def test_pretraining_shapes(tiny_config, overrides, num_patches, patch_dim):
    config = tiny_config(**overrides)
    pixel_values = torch.randn(3, config.num_channels, 8, 8)
    out = MAEForPreTraining(config)(pixel_values)
    assert out.loss.shape == ()
    assert out.logits.shape == (3, num_patches, patch_dim)
    assert out.mask.shape == (3, num_patches)
    assert set(out.mask.unique().tolist()) <= {0.0, 1.0}
    masked = num_patches - kept(num_patches, config.mask_ratio)
    assert torch.equal(out.mask.sum(dim=1), torch.full((3,), float(masked)))
    assert torch.equal(out.ids_restore.sort(dim=1).values, torch.arange(num_patches).expand(3, -1))


# ---------------------------------------------------------------- masking


def test_same_noise_same_outputs_different_noise_different_mask(tiny_config, pixel_values, noise):
    model = MAEForPreTraining(tiny_config()).train()
    first = model(pixel_values, noise=noise)
    torch.rand(100)  # move the global RNG: only `noise` may decide the masking
    second = model(pixel_values, noise=noise)
    for key in ("loss", "logits", "mask", "ids_restore"):
        assert torch.equal(first[key], second[key]), key
    flipped = model(pixel_values, noise=1 - noise)  # keeps the highest-noise patches instead
    assert not torch.equal(first.mask, flipped.mask)


def test_kept_patches_are_those_with_lowest_noise(tiny_config, pixel_values, noise):
    model = MAEForPreTraining(tiny_config())
    out = model(pixel_values, noise=noise)
    num_keep = kept(N, model.config.mask_ratio)
    lowest = noise.argsort(dim=1)[:, :num_keep]
    expected_mask = torch.ones(2, N).scatter_(1, lowest, 0.0)
    assert torch.equal(out.mask, expected_mask)

    # The encoder really sees those patches, in order of increasing noise.
    encoded = model.mae(pixel_values, noise=noise, mask_ratio=model.config.mask_ratio, output_hidden_states=True)
    embeddings = model.mae.embeddings
    tokens = embeddings.patch_projection(model.patchify(pixel_values)) + embeddings.position_embeddings[:, 1:]
    expected_tokens = torch.gather(tokens, 1, lowest[:, :, None].expand(-1, -1, 16))
    torch.testing.assert_close(encoded.hidden_states[0][:, 1:], expected_tokens, rtol=0, atol=1e-6)


# ---------------------------------------------------------------- loss


def test_loss_only_counts_masked_patches(tiny_config, pixel_values, noise):
    model = MAEForPreTraining(tiny_config()).eval()
    out = model(pixel_values, noise=noise)
    assert torch.equal(model.forward_loss(pixel_values, out.logits, out.mask), out.loss)

    visible_changed = out.logits.clone()
    visible_changed[out.mask == 0] += 100.0
    assert torch.equal(model.forward_loss(pixel_values, visible_changed, out.mask), out.loss)

    masked_changed = out.logits.clone()
    row, col = (out.mask == 1).nonzero()[0]
    masked_changed[row, col] += 1.0
    assert not torch.allclose(model.forward_loss(pixel_values, masked_changed, out.mask), out.loss)

    per_patch = ((out.logits - model.patchify(pixel_values)) ** 2).mean(dim=-1)
    by_hand = (per_patch * out.mask).sum() / out.mask.sum()
    torch.testing.assert_close(out.loss, by_hand, rtol=1e-6, atol=0)


def test_norm_pix_loss(tiny_config, pixel_values, noise):
    normed = MAEForPreTraining(tiny_config(norm_pix_loss=True)).eval()
    plain = MAEForPreTraining(tiny_config(norm_pix_loss=False)).eval()
    plain.load_state_dict(normed.state_dict())
    out = normed(pixel_values, noise=noise)
    out_plain = plain(pixel_values, noise=noise)
    assert torch.equal(out.logits, out_plain.logits)

    target = normed.patchify(pixel_values)
    mean = target.mean(dim=-1, keepdim=True)

    def masked_mse(var):
        per_patch = ((out.logits - (target - mean) / (var + 1e-6) ** 0.5) ** 2).mean(dim=-1)
        return (per_patch * out.mask).sum() / out.mask.sum()

    torch.testing.assert_close(out.loss, masked_mse(target.var(dim=-1, unbiased=True, keepdim=True)),
                               rtol=1e-6, atol=0)
    # The check above tells the unbiased variance from the biased one, and normalised from raw targets:
    assert not torch.allclose(out.loss, masked_mse(target.var(dim=-1, unbiased=False, keepdim=True)), rtol=1e-4)
    assert not torch.allclose(out.loss, out_plain.loss, rtol=1e-3)


# ---------------------------------------------------------------- patchify


@pytest.mark.parametrize("overrides", [{}, dict(patch_size=4, num_channels=1, image_mean=[0.5], image_std=[0.5])])
def test_patchify_unpatchify_are_inverses(tiny_config, overrides):
    model = MAEForPreTraining(tiny_config(**overrides))
    images = torch.randn(2, model.config.num_channels, 8, 8)
    assert torch.equal(model.unpatchify(model.patchify(images)), images)
    patches = torch.randn(2, model.config.num_patches, model.config.patch_size**2 * model.config.num_channels)
    assert torch.equal(model.patchify(model.unpatchify(patches)), patches)


def test_patchify_layout(tiny_config):
    model = MAEModel(tiny_config(image_size=8, patch_size=2))
    channels, size, p, grid = 3, 8, 2, 4
    image = torch.arange(channels * size * size, dtype=torch.float32).reshape(1, channels, size, size)
    patches = model.patchify(image)[0]
    for k in range(grid * grid):
        top, left = (k // grid) * p, (k % grid) * p
        # Within a patch: (row, column, channel), as in ViTMAE and the original MAE code.
        expected = [image[0, c, top + i, left + j] for i in range(p) for j in range(p) for c in range(channels)]
        assert torch.equal(patches[k], torch.stack(expected)), k


# ---------------------------------------------------------------- gradients


def assert_all_trainable_get_gradients(model):
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trainable
    for name, param in trainable:
        assert param.grad is not None, name
        assert param.grad.abs().sum() > 0, name


def test_gradients_reach_every_parameter_in_pretraining(tiny_config, pixel_values, noise):
    model = MAEForPreTraining(tiny_config()).train()
    model(pixel_values, noise=noise).loss.backward()
    assert_all_trainable_get_gradients(model)
    assert len([p for p in model.parameters() if p.requires_grad]) == len(list(model.parameters()))


def test_gradients_reach_every_parameter_when_fine_tuning(tiny_config, pixel_values):
    model = MAEForImageClassification(tiny_config(num_labels=3)).train()
    assert all(p.requires_grad for p in model.parameters())
    model(pixel_values, labels=torch.tensor([0, 2])).loss.backward()
    assert_all_trainable_get_gradients(model)


def test_linear_probe_trains_only_the_head(tiny_config, pixel_values):
    model = MAEForImageClassification(tiny_config(num_labels=3, linear_probe=True, drop_path_rate=0.5,
                                                  hidden_dropout_prob=0.5))
    model.train()
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"classifier.weight", "classifier.bias"}
    assert not any(m.training for m in model.mae.modules())
    assert model.training and model.classifier.training and model.head_norm.training
    assert isinstance(model.head_norm, torch.nn.BatchNorm1d) and not model.head_norm.affine
    assert list(model.head_norm.parameters()) == []

    out = model(pixel_values, labels=torch.tensor([0, 2]))
    out.loss.backward()
    assert all(p.grad is None for p in model.mae.parameters())
    assert_all_trainable_get_gradients(model)
    # Dropout and drop-path are off in the frozen encoder even in training mode.
    assert torch.equal(model.mae(pixel_values).pooler_output, model.mae(pixel_values).pooler_output)


# `gradient_checkpointing_enable` is the name the brief (and transformers 4.x) uses; 5.x renamed it and warns.
@pytest.mark.filterwarnings("ignore:.*is deprecated.*:FutureWarning")
@pytest.mark.parametrize("enable", ["activation_checkpointing_enable", "gradient_checkpointing_enable"])
def test_gradient_checkpointing_gives_same_loss_and_gradients(tiny_config, pixel_values, noise, enable):
    plain = MAEForPreTraining(tiny_config()).train()
    checkpointed = MAEForPreTraining(tiny_config()).train()
    checkpointed.load_state_dict(plain.state_dict())
    getattr(checkpointed, enable)()
    assert checkpointed.is_activation_checkpointing
    assert all(layer.gradient_checkpointing for layer in [*checkpointed.mae.layers, *checkpointed.decoder.layers])

    calls = {"plain": 0, "checkpointed": 0}
    for key, model in (("plain", plain), ("checkpointed", checkpointed)):
        mlp = model.mae.layers[0].mlp

        def counted(x, key=key, forward=mlp.forward):  # (forward hooks do not fire in the recomputation)
            calls[key] += 1
            return forward(x)

        mlp.forward = counted

    loss = plain(pixel_values, noise=noise).loss
    loss.backward()
    loss_checkpointed = checkpointed(pixel_values, noise=noise).loss
    loss_checkpointed.backward()
    assert calls == {"plain": 1, "checkpointed": 2}  # the checkpointed block was recomputed in the backward pass
    torch.testing.assert_close(loss_checkpointed, loss)
    grads = dict(checkpointed.named_parameters())
    for name, param in plain.named_parameters():
        torch.testing.assert_close(grads[name].grad, param.grad, msg=name)


# ---------------------------------------------------------------- save / load


def outputs_for(model, pixel_values, noise):
    with torch.no_grad():
        if isinstance(model, MAEForPreTraining):
            out = model(pixel_values, noise=noise)
            return [out.loss, out.logits, out.mask, out.ids_restore]
        if isinstance(model, MAEModel):
            masked = model(pixel_values, noise=noise, mask_ratio=0.75)
            out = model(pixel_values)
            return [masked.last_hidden_state, out.last_hidden_state, out.pooler_output]
        return [model(pixel_values).logits]


@pytest.mark.parametrize(
    "model_class, overrides",
    [
        (MAEForPreTraining, dict(decoder_hidden_size=8)),
        (MAEModel, {}),
        (MAEForImageClassification, dict(num_labels=3)),
        (MAEForImageClassification, dict(num_labels=3, linear_probe=True)),
    ],
)
def test_save_load_round_trip_is_exact(tmp_path, tiny_config, perturb, pixel_values, noise, model_class, overrides):
    config = tiny_config(**overrides)
    model = perturb(model_class(config))
    model.train()
    model(pixel_values)  # moves the linear probe's BatchNorm statistics away from their initial values
    model.eval()
    model.save_pretrained(tmp_path)
    loaded = model_class.from_pretrained(tmp_path).eval()

    state, loaded_state = model.state_dict(), loaded.state_dict()
    assert state.keys() == loaded_state.keys()
    for key in state:
        assert torch.equal(state[key], loaded_state[key]), key
    for expected, actual in zip(outputs_for(model, pixel_values, noise), outputs_for(loaded, pixel_values, noise),
                                strict=True):
        assert torch.equal(expected, actual)

    encoder = loaded if isinstance(loaded, MAEModel) else loaded.mae
    tables = [(encoder.embeddings, "position_embeddings", config.hidden_size)]
    if isinstance(loaded, MAEForPreTraining):
        tables.append((loaded.decoder, "position_embeddings", config.decoder_hidden_size))
    for module, name, width in tables:
        assert name in dict(module.named_buffers(recurse=False))
        assert name not in dict(module.named_parameters(recurse=False))
        assert torch.equal(getattr(module, name), sincos_position_embedding(4, width))
    assert not any("position" in name for name, _ in loaded.named_parameters())


def test_encoder_carried_from_pretraining_checkpoint(tmp_path, tiny_config, perturb):
    pretrained = perturb(MAEForPreTraining(tiny_config()))
    pretrained.save_pretrained(tmp_path)
    encoder_state = pretrained.mae.state_dict()

    def assert_encoder_is_pretrained(encoder):
        state = encoder.state_dict()
        assert state.keys() == encoder_state.keys()
        for key in state:
            assert torch.equal(state[key], encoder_state[key]), key

    assert_encoder_is_pretrained(MAEModel.from_pretrained(tmp_path))

    torch.manual_seed(1)
    classifier = MAEForImageClassification.from_pretrained(tmp_path, num_labels=10)
    assert_encoder_is_pretrained(classifier.mae)
    assert classifier.classifier.weight.shape == (10, 16)
    assert torch.equal(classifier.classifier.bias, torch.zeros(10))
    assert all(p.requires_grad for p in classifier.parameters())
    torch.manual_seed(2)
    other = MAEForImageClassification.from_pretrained(tmp_path, num_labels=10)
    assert not torch.equal(classifier.classifier.weight, other.classifier.weight)  # random, not loaded

    probe = MAEForImageClassification.from_pretrained(tmp_path, num_labels=10, linear_probe=True)
    assert_encoder_is_pretrained(probe.mae)
    assert not any(p.requires_grad for p in probe.mae.parameters())
    assert all(p.requires_grad for p in probe.classifier.parameters())
    probe.train()
    assert not probe.mae.training


@pytest.mark.parametrize("linear_probe, std", [(False, 2e-5), (True, 0.01)])
def test_classifier_head_init_follows_mae_paper(tmp_path, tiny_config, linear_probe, std):
    # `_init_weights` documents a trunc-normal head (std 2e-5 fine-tuning, 0.01 probing), both when the model is
    # built and when the head is missing from a pretraining checkpoint.
    built = MAEForImageClassification(tiny_config(hidden_size=64, num_labels=100, linear_probe=linear_probe))
    MAEForPreTraining(tiny_config(hidden_size=64)).save_pretrained(tmp_path)
    loaded = MAEForImageClassification.from_pretrained(tmp_path, num_labels=100, linear_probe=linear_probe)
    for model in (built, loaded):
        weight = model.classifier.weight
        assert std / 2 < weight.std().item() < std * 2
        assert torch.equal(model.classifier.bias, torch.zeros(100))


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("model_class", [MAEForPreTraining, MAEModel, MAEForImageClassification])
@pytest.mark.parametrize(
    "bad_input",
    [torch.randn(2, 1, 8, 8), torch.randn(2, 3, 16, 16), torch.randn(2, 3, 8, 4), torch.randn(3, 8, 8),
     torch.randn(2, 8, 8, 3)],
    ids=["channels", "size", "not-square", "3-dim", "channels-last"],
)
def test_bad_pixel_values_name_the_expected_shape(tiny_config, model_class, bad_input):
    model = model_class(tiny_config(num_labels=2))
    with pytest.raises(ValueError, match=re.escape(EXPECTED_SHAPE)):
        model(bad_input)


@pytest.mark.parametrize("model_class", [MAEForPreTraining, MAEModel, MAEForImageClassification])
def test_integer_pixel_values_are_refused(tiny_config, model_class):
    model = model_class(tiny_config(num_labels=2))
    with pytest.raises(ValueError, match="floating point"):
        model(torch.zeros(2, 3, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match=re.escape(EXPECTED_SHAPE)):
        model([[0.0]])


def test_float_inputs_of_any_dtype_are_cast_to_the_model(tiny_config, pixel_values, noise):
    model = MAEForPreTraining(tiny_config())
    reference = model(pixel_values, noise=noise).loss
    torch.testing.assert_close(model(pixel_values.double(), noise=noise).loss, reference)
    half = MAEForPreTraining(tiny_config()).to(torch.bfloat16)
    assert half(pixel_values, noise=noise).logits.dtype == torch.bfloat16  # fp32 images into a bf16 model


@pytest.mark.parametrize("model_class", [MAEForPreTraining, MAEModel, MAEForImageClassification])
def test_empty_batch_is_refused(tiny_config, model_class):
    with pytest.raises(ValueError, match="empty batch"):
        model_class(tiny_config(num_labels=2))(torch.zeros(0, 3, 8, 8))


def test_bad_noise_and_mask_ratio(tiny_config, pixel_values):
    pretraining, encoder = MAEForPreTraining(tiny_config()), MAEModel(tiny_config())
    for bad_noise in (torch.rand(2, 15), torch.rand(1, 16), torch.rand(2, 16, 1)):
        with pytest.raises(ValueError, match=re.escape("(2, 16)")):
            pretraining(pixel_values, noise=bad_noise)
        with pytest.raises(ValueError, match=re.escape("(2, 16)")):
            encoder(pixel_values, noise=bad_noise, mask_ratio=0.5)
    for ratio in (1.0, -0.1):
        with pytest.raises(ValueError, match="mask_ratio"):
            encoder(pixel_values, mask_ratio=ratio)


def test_pixel_values_are_checked_once_per_forward(tiny_config, pixel_values, noise, monkeypatch):
    """One `patch_grid` check per forward, however many parts (encoder, decoder, loss) use the patches."""
    from mae_hf.modeling_mae import MAEPreTrainedModel

    checks = []
    patch_grid = MAEPreTrainedModel.patch_grid
    monkeypatch.setattr(MAEPreTrainedModel, "patch_grid",
                        lambda self, *args: checks.append(1) or patch_grid(self, *args))
    for model_class, kwargs in ((MAEForPreTraining, {"noise": noise}), (MAEModel, {}), (MAEForImageClassification, {})):
        checks.clear()
        model_class(tiny_config())(pixel_values, **kwargs)
        assert len(checks) == 1, model_class.__name__


def test_one_mask_ratio_rule_for_the_config_and_every_call(tiny_config, pixel_values, noise):
    """The config and each call are checked by the same rule (configuration_mae.MASK_RATIO_RULES)."""
    with pytest.raises(ValueError, match=re.escape("invalid mask_ratio=0.95: leaves no visible patch out of 16")):
        tiny_config(mask_ratio=0.95)
    for model in (MAEModel(tiny_config()), MAEForPreTraining(tiny_config())):
        with pytest.raises(ValueError, match=re.escape("invalid mask_ratio=0.95: leaves no visible patch out of 16")):
            model(pixel_values, noise=noise, mask_ratio=0.95)
    with pytest.raises(ValueError, match=re.escape("invalid mask_ratio=0.95: leaves no visible patch out of 4")):
        MAEModel(tiny_config(patch_size=4))(pixel_values, mask_ratio=0.95)  # the patches of these images


def test_bad_labels(tiny_config, pixel_values):
    model = MAEForImageClassification(tiny_config(num_labels=3))
    for labels in (torch.tensor([[0], [1]]), torch.tensor([0, 1, 2]), torch.tensor(1)):
        with pytest.raises(ValueError, match=re.escape("(batch,) = (2,)")):
            model(pixel_values, labels=labels)
    with pytest.raises(ValueError, match=re.escape("(batch, num_labels) = (2, 3)")):  # floats: multi-label
        model(pixel_values, labels=torch.tensor([0.0, 1.0]))
    for labels, shown in (([0, 1], "torch.Tensor, got list"), (torch.tensor([True, False]), "torch.bool")):
        with pytest.raises(ValueError, match=re.escape(shown)):
            model(pixel_values, labels=labels)
    assert model.config.problem_type is None  # a refused call settles nothing
    expected = model(pixel_values, labels=torch.tensor([0, 2])).loss
    assert model.config.problem_type == "single_label_classification"
    for dtype in (torch.int32, torch.uint8):  # any integer type: the same loss as int64
        torch.testing.assert_close(model(pixel_values, labels=torch.tensor([0, 2], dtype=dtype)).loss, expected)
    regression = MAEForImageClassification(tiny_config(num_labels=2, problem_type="regression"))
    with pytest.raises(ValueError, match=re.escape("(batch, num_labels) = (2, 2) floats")):  # would broadcast
        regression(pixel_values, labels=torch.tensor([0.5, 1.0]))


def test_a_linear_probe_names_a_training_batch_of_one_and_an_unfrozen_encoder(tiny_config, pixel_values, caplog):
    probe = MAEForImageClassification(tiny_config(num_labels=3, linear_probe=True)).train()
    with pytest.raises(ValueError, match="a training batch needs at least 2 images"):
        probe(pixel_values[:1], labels=torch.tensor([1]))
    probe.eval()(pixel_values[:1])  # evaluation normalises with the running statistics: one image is fine
    probe.requires_grad_(True)
    from transformers.utils import logging

    logging.get_logger("transformers").propagate = True
    with caplog.at_level("WARNING"):
        probe(pixel_values)
    assert "parameters set back to requires_grad=True are not trained" in caplog.text


def test_noise_alone_masks_the_configured_ratio_as_vit_mae_does(tiny_config, pixel_values):
    encoder = MAEModel(tiny_config())
    noise = torch.rand(2, 16, generator=torch.Generator().manual_seed(0))
    alone, explicit = encoder(pixel_values, noise=noise), encoder(pixel_values, noise=noise,
                                                                  mask_ratio=encoder.config.mask_ratio)
    torch.testing.assert_close(alone.last_hidden_state, explicit.last_hidden_state)
    assert torch.equal(alone.mask, explicit.mask) and alone.mask.sum() > 0
    unmasked = encoder(pixel_values, mask_ratio=None)  # None: the default, every patch
    assert unmasked.last_hidden_state.shape[1] == 1 + 16 and unmasked.mask.sum() == 0


# ---------------------------------------------------------------- classification


def test_multi_label_and_regression_losses(tiny_config, pixel_values):
    multi = MAEForImageClassification(tiny_config(num_labels=3))
    targets = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    output = multi(pixel_values, labels=targets)
    torch.testing.assert_close(output.loss, F.binary_cross_entropy_with_logits(output.logits, targets))
    assert multi.config.problem_type == "multi_label_classification"
    regression = MAEForImageClassification(tiny_config(num_labels=1))
    values = torch.tensor([0.5, -1.0])
    output = regression(pixel_values, labels=values)
    torch.testing.assert_close(output.loss, F.mse_loss(output.logits.squeeze(), values))


def test_classification_loss_is_cross_entropy(tiny_config, perturb, pixel_values):
    model = perturb(MAEForImageClassification(tiny_config(num_labels=5)), scale=0.5).eval()
    labels = torch.tensor([4, 1])
    out = model(pixel_values, labels=labels)
    assert out.logits.shape == (2, 5)
    torch.testing.assert_close(out.loss, F.cross_entropy(out.logits, labels), rtol=1e-6, atol=0)
    assert model(pixel_values).loss is None


def test_pooling(tiny_config, perturb, pixel_values):
    cls_model = perturb(MAEModel(tiny_config(pooling="cls"))).eval()
    mean_model = MAEModel(tiny_config(pooling="mean")).eval()
    mean_model.load_state_dict(cls_model.state_dict())
    by_cls, by_mean = cls_model(pixel_values), mean_model(pixel_values)
    assert torch.equal(by_cls.last_hidden_state, by_mean.last_hidden_state)
    assert torch.equal(by_cls.pooler_output, by_cls.last_hidden_state[:, 0])
    torch.testing.assert_close(by_mean.pooler_output, by_mean.last_hidden_state[:, 1:].mean(dim=1))
    assert not torch.allclose(by_cls.pooler_output, by_mean.pooler_output, atol=1e-3)

    classifier = perturb(MAEForImageClassification(tiny_config(pooling="mean", num_labels=4))).eval()
    pooled = classifier.mae(pixel_values).pooler_output
    torch.testing.assert_close(classifier(pixel_values).logits, classifier.classifier(pooled))


# ---------------------------------------------------------------- image processor


def test_image_processor_handles_pil_modes(tiny_config):
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
    processor = MAEModel(tiny_config(image_mean=mean, image_std=std)).image_processor()
    mean, std = torch.tensor(mean)[:, None, None], torch.tensor(std)[:, None, None]
    for mode in ("L", "RGBA", "P", "RGB"):
        pixel_values = processor(Image.new(mode, (13, 17)), return_tensors="pt").pixel_values
        assert pixel_values.shape == (1, 3, 8, 8), mode
        assert pixel_values.dtype == torch.float32, mode

    colour = (10, 200, 30)
    pixel_values = processor(Image.new("RGB", (13, 17), colour), return_tensors="pt").pixel_values
    expected = (torch.tensor(colour, dtype=torch.float32)[:, None, None] / 255 - mean) / std
    torch.testing.assert_close(pixel_values[0], expected.expand(3, 8, 8), rtol=0, atol=1e-5)

    grey = processor(Image.new("L", (13, 17), 100), return_tensors="pt").pixel_values
    torch.testing.assert_close(grey[0], ((100 / 255 - mean) / std).expand(3, 8, 8), rtol=0, atol=1e-5)

    batch = processor([Image.new("RGB", (5, 5)), Image.new("RGBA", (40, 9))], return_tensors="pt").pixel_values
    assert batch.shape == (2, 3, 8, 8)


def reference_sincos(grid_size, dim):
    """The original MAE table written out in numpy, independently of ours: half the channels encode the column
    (sin block, then cos block), the other half the row; frequencies 1 / 10000**(i / (dim / 4)); a zero class row."""
    frequencies = 1.0 / 10000 ** (np.arange(dim // 4) / (dim // 4))
    table = np.zeros((1 + grid_size**2, dim))
    for row in range(grid_size):
        for column in range(grid_size):
            angles_x, angles_y = column * frequencies, row * frequencies
            table[1 + row * grid_size + column] = np.concatenate(
                [np.sin(angles_x), np.cos(angles_x), np.sin(angles_y), np.cos(angles_y)])
    return torch.from_numpy(table).float()[None]


@pytest.mark.parametrize("grid_size, dim", [(4, 16), (16, 192), (3, 8)])
def test_sincos_table_matches_an_independent_reference(grid_size, dim):
    torch.testing.assert_close(sincos_position_embedding(grid_size, dim), reference_sincos(grid_size, dim))


def test_attention_sdpa_by_default_and_eager_gives_the_same(tmp_path, tiny_config, perturb, pixel_values, noise):
    model = perturb(MAEForPreTraining(tiny_config()))
    assert model.config._attn_implementation == "sdpa"
    model.save_pretrained(tmp_path)
    eager = MAEForPreTraining.from_pretrained(tmp_path, attn_implementation="eager")
    assert eager.config._attn_implementation == "eager"
    torch.testing.assert_close(eager(pixel_values, noise=noise).logits, model(pixel_values, noise=noise).logits,
                               atol=1e-5, rtol=1e-5)


def test_config_changes_at_load_are_checked(tmp_path, tiny_config):
    MAEModel(tiny_config()).save_pretrained(tmp_path)
    for change, field in (({"pooling": "max"}, "pooling"), ({"mask_ratio": 1.0}, "mask_ratio")):
        with pytest.raises(ValueError, match=f"invalid {field}="):
            MAEModel.from_pretrained(tmp_path, **change)


def test_input_embeddings_are_the_patch_projection(tiny_config):
    model = MAEForImageClassification(tiny_config(num_labels=2))
    assert model.get_input_embeddings() is model.mae.embeddings.patch_projection


def test_pretraining_refuses_mask_ratio_zero(tiny_config):
    tiny_config(mask_ratio=0.0)  # a valid config for the encoder and classifier...
    with pytest.raises(ValueError, match="mask_ratio > 0"):
        MAEForPreTraining(tiny_config(mask_ratio=0.0))  # ...but pretraining has no masked patch to learn from


def test_noise_without_masking_keeps_image_order(tiny_config, pixel_values, noise):
    model = MAEModel(tiny_config()).eval()
    with_noise, without = model(pixel_values, noise=noise, mask_ratio=0.0), model(pixel_values)
    assert torch.equal(with_noise.last_hidden_state, without.last_hidden_state)
    assert torch.equal(with_noise.ids_restore, torch.arange(N).expand(2, -1))


def test_pretraining_mask_ratio_per_call(tiny_config, pixel_values, noise):
    """`mask_ratio=` masks that fraction for one call (the demo's slider) and leaves the config as it was."""
    model = MAEForPreTraining(tiny_config()).eval()
    half = model(pixel_values, noise=noise, mask_ratio=0.5)
    assert half.mask.sum(dim=1).tolist() == [8.0, 8.0] and model.config.mask_ratio == 0.75
    assert model(pixel_values, noise=noise).mask.sum(dim=1).tolist() == [12.0, 12.0]
    for bad in (0.0, 1.0):
        with pytest.raises(ValueError, match="mask_ratio in \\(0, 1\\)"):
            model(pixel_values, noise=noise, mask_ratio=bad)


def test_tables_of_other_grids_are_kept_for_a_few_sizes_only(tiny_config):
    model = MAEModel(tiny_config()).eval()
    for side in range(2, 2 + 2 * 12, 2):  # twelve image sizes
        model(torch.randn(1, 3, side, side), interpolate_pos_encoding=True)
    cached = model.embeddings.other_grids
    assert len(cached) == model.embeddings.MAX_OTHER_GRIDS and ((12, 12), torch.device("cpu"), torch.float32) in cached

"""The checks transformers runs on its own models (its ModelTesterMixin / ConfigTester), written for mae_hf: one model
tester with a tiny config, the same checks for all three classes, plus what mae_hf offers beyond ViTMAE (any image
size, export). Issue 8."""

import copy
import json

import pytest
import torch
from fixtures_runs import TINY_MODEL
from transformers import AttentionInterface
from transformers.initialization import no_init_weights
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils import is_flash_attn_2_available, is_flash_attn_3_available

from mae_hf import (
    MAEConfig,
    MAEForImageClassification,
    MAEForPreTraining,
    MAEModel,
    sincos_position_embedding,
)
from mae_hf.configuration_mae import CIFAR10_MEAN, CIFAR10_STD
from mae_hf.modeling_mae import eager_attention_forward

ALL_MODEL_CLASSES = (MAEModel, MAEForPreTraining, MAEForImageClassification)


class MAEModelTester:
    """Tiny config and inputs for every model class, and what their outputs must look like."""

    batch_size = 2
    num_labels = 3
    grid = TINY_MODEL["image_size"] // TINY_MODEL["patch_size"]
    num_patches = grid**2

    def get_config(self, **overrides) -> MAEConfig:
        return MAEConfig(**{**TINY_MODEL, "num_labels": self.num_labels, **overrides})

    def prepare_inputs(self, model_class, config, size=None, batch=None, labels=False) -> dict:
        batch = batch or self.batch_size
        height, width = size or (config.image_size, config.image_size)
        generator = torch.Generator().manual_seed(1)
        inputs = {"pixel_values": torch.randn(batch, config.num_channels, height, width, generator=generator)}
        if model_class is MAEForPreTraining:  # a fixed mask, so that two calls are comparable
            grid = (height // config.patch_size) * (width // config.patch_size)
            inputs["noise"] = torch.rand(batch, grid, generator=generator)
        if labels and model_class is MAEForImageClassification:
            inputs["labels"] = torch.arange(batch) % config.num_labels
        return inputs

    def encoder_tokens(self, model_class, config, num_patches=None) -> int:
        """Tokens the encoder sees: the class token and every patch, or the visible ones when pretraining."""
        num_patches = num_patches or self.num_patches
        if model_class is MAEForPreTraining:
            return 1 + int(num_patches * (1 - config.mask_ratio))
        return 1 + num_patches

    @staticmethod
    def main_output(model_class, outputs) -> torch.Tensor:
        return outputs.last_hidden_state if model_class is MAEModel else outputs.logits

    @staticmethod
    def encoder(model):
        return model if isinstance(model, MAEModel) else model.mae


tester = MAEModelTester()


def build(model_class, **overrides):
    torch.manual_seed(0)
    model = model_class(tester.get_config(**overrides))
    with torch.no_grad():  # LayerNorms and biases away from 1 / 0, so that a wrong load would show
        for param in model.parameters():
            param.add_(0.1 * torch.randn_like(param))
    return model.eval()


def zero_init_config(config: MAEConfig) -> MAEConfig:
    """What transformers' `_config_zero_init` does in its model tests: every field named like an init scale -> 1e-10."""
    config = copy.deepcopy(config)
    for key in list(config.__dict__):
        if "_range" in key or "_std" in key or "initializer_factor" in key or "layer_scale" in key:
            setattr(config, key, 1e-10)
    return config


# ---------------------------------------------------------------- config (ConfigTester)


def test_config_common_properties_and_round_trips(tmp_path):
    config = tester.get_config()
    for name in ("hidden_size", "num_attention_heads", "num_hidden_layers", "num_channels", "image_size",
                 "patch_size"):
        assert hasattr(config, name), name
    assert MAEConfig.from_dict(config.to_dict()).to_dict() == config.to_dict()
    assert MAEConfig(**json.loads(config.to_json_string(use_diff=False))).to_dict() == config.to_dict()
    config.save_pretrained(tmp_path)
    assert MAEConfig.from_pretrained(tmp_path).to_dict() == config.to_dict()
    assert MAEConfig(num_labels=5).num_labels == 5


@pytest.mark.parametrize("channels, mean, std", [
    (3, [0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616]), (1, [0.5], [0.5]), (4, [0.5] * 4, [0.5] * 4)])
def test_image_statistics_follow_the_channel_count(channels, mean, std):
    config = MAEConfig(num_channels=channels)
    assert (config.image_mean, config.image_std) == (mean, std)
    processor = MAEModel(tester.get_config(num_channels=channels)).image_processor()
    assert list(processor.image_mean) == mean and list(processor.image_std) == std


def test_single_number_statistics_apply_to_every_channel_and_bad_ones_are_refused():
    assert MAEConfig(image_std=0.5, image_mean=0).image_std == [0.5] * 3
    assert MAEConfig(image_std=0.5, image_mean=0).image_mean == [0.0] * 3
    for bad, match in (({"image_std": [0.5, 0.5]}, "one value per channel"), ({"image_std": "0.5"}, "a number"),
                       ({"image_mean": [0.1, None, 0.2]}, "a number"), ({"image_std": 0.0}, "positive")):
        with pytest.raises(ValueError, match=match):
            MAEConfig(**bad)


@pytest.mark.parametrize("model_class", ALL_MODEL_CLASSES)
def test_model_builds_from_a_zero_init_config(model_class):
    config = zero_init_config(tester.get_config())
    assert config.image_std == 1e-10 and config.initializer_range == 1e-10  # the tooling did rewrite them
    model = model_class(config).eval()
    assert model.config.image_std == [1e-10] * 3  # taken as one value per channel
    embeddings = tester.encoder(model).embeddings
    assert embeddings.cls_token.abs().max() < 1e-8  # initializer_range did reach the init
    outputs = model(**tester.prepare_inputs(model_class, config))
    assert torch.isfinite(tester.main_output(model_class, outputs)).all()


# ---------------------------------------------------------------- outputs


@pytest.mark.parametrize("model_class", ALL_MODEL_CLASSES)
def test_output_shapes(model_class):
    model = build(model_class)
    config = model.config
    outputs = model(**tester.prepare_inputs(model_class, config, labels=True))
    batch = tester.batch_size
    if model_class is MAEModel:
        assert outputs.last_hidden_state.shape == (batch, 1 + tester.num_patches, config.hidden_size)
        assert outputs.pooler_output.shape == (batch, config.hidden_size)
    elif model_class is MAEForPreTraining:
        assert outputs.logits.shape == (batch, tester.num_patches, config.patch_size**2 * config.num_channels)
        assert outputs.loss.shape == () and outputs.mask.shape == (batch, tester.num_patches)
    else:
        assert outputs.logits.shape == (batch, tester.num_labels) and outputs.loss.shape == ()
    assert outputs.get("hidden_states") is None and outputs.get("attentions") is None  # not asked for


@pytest.mark.parametrize("model_class", ALL_MODEL_CLASSES)
def test_hidden_states_output(model_class):
    model = build(model_class)
    config, inputs = model.config, tester.prepare_inputs(model_class, model.config)
    outputs = model(**inputs, output_hidden_states=True)
    tokens = tester.encoder_tokens(model_class, config)
    assert len(outputs.hidden_states) == config.num_hidden_layers + 1  # embeddings, then each block
    for hidden in outputs.hidden_states:
        assert hidden.shape == (tester.batch_size, tokens, config.hidden_size)
    if model_class is MAEModel:  # the last one is the last block's output, before the final LayerNorm
        torch.testing.assert_close(model.norm(outputs.hidden_states[-1]), outputs.last_hidden_state)
    if model_class is MAEForPreTraining:
        assert len(outputs.decoder_hidden_states) == config.decoder_num_hidden_layers + 1
        for hidden in outputs.decoder_hidden_states:
            assert hidden.shape == (tester.batch_size, 1 + tester.num_patches, config.decoder_hidden_size)
        decoder = model.decoder
        torch.testing.assert_close(decoder.pred(decoder.norm(outputs.decoder_hidden_states[-1]))[:, 1:],
                                   outputs.logits)
    again = model_class(tester.get_config(output_hidden_states=True))  # the config's default is honoured
    again.load_state_dict(model.state_dict())
    from_config = again.eval()(**inputs)
    assert len(from_config.hidden_states) == config.num_hidden_layers + 1
    torch.testing.assert_close(from_config.hidden_states[-1], outputs.hidden_states[-1])


def test_hidden_states_selected_by_index_count_from_each_stack():
    model = build(MAEForPreTraining, num_hidden_layers=3)
    inputs = tester.prepare_inputs(MAEForPreTraining, model.config)
    everything = model(**inputs, output_hidden_states=True)
    last_only = model(**inputs, output_hidden_states=[-1])
    assert [h is None for h in last_only.hidden_states] == [True, True, True, False]
    assert [h is None for h in last_only.decoder_hidden_states] == [True, False]  # the decoder's own depth
    torch.testing.assert_close(last_only.hidden_states[-1], everything.hidden_states[-1])
    torch.testing.assert_close(last_only.decoder_hidden_states[-1], everything.decoder_hidden_states[-1])


def manual_attention(layer, hidden):
    """Softmax attention of one block written out from its weights."""
    attention = layer.attention
    batch, length, width = hidden.shape
    q, k, _ = attention.qkv(layer.norm1(hidden)).view(batch, length, 3, attention.heads, -1).permute(2, 0, 3, 1, 4)
    return (q @ k.transpose(-2, -1) / (width // attention.heads) ** 0.5).softmax(dim=-1)


@pytest.mark.parametrize("model_class", ALL_MODEL_CLASSES)
def test_attention_outputs(model_class):
    model = build(model_class)
    assert model.config._attn_implementation == "sdpa"  # maps are returned whatever the backend
    config, inputs = model.config, tester.prepare_inputs(model_class, model.config)
    outputs = model(**inputs, output_attentions=True, output_hidden_states=True)
    tokens = tester.encoder_tokens(model_class, config)
    assert len(outputs.attentions) == config.num_hidden_layers
    encoder = tester.encoder(model)
    for i, attention in enumerate(outputs.attentions):
        assert attention.shape == (tester.batch_size, config.num_attention_heads, tokens, tokens)
        torch.testing.assert_close(attention, manual_attention(encoder.layers[i], outputs.hidden_states[i]))
    if model_class is MAEForPreTraining:
        assert len(outputs.decoder_attentions) == config.decoder_num_hidden_layers
        expected = (tester.batch_size, config.decoder_num_attention_heads, 1 + tester.num_patches,
                    1 + tester.num_patches)
        assert outputs.decoder_attentions[0].shape == expected
        torch.testing.assert_close(outputs.decoder_attentions[0],
                                   manual_attention(model.decoder.layers[0], outputs.decoder_hidden_states[0]))
    # The other outputs do not change when the maps are asked for.
    torch.testing.assert_close(tester.main_output(model_class, model(**inputs)),
                               tester.main_output(model_class, outputs), rtol=1e-5, atol=1e-5)

    again = model_class(tester.get_config(output_attentions=True))  # the config's default is honoured
    again.load_state_dict(model.state_dict())
    from_config = again.eval()(**inputs)
    assert len(from_config.attentions) == config.num_hidden_layers
    torch.testing.assert_close(from_config.attentions[0], outputs.attentions[0])


@pytest.mark.parametrize("model_class", ALL_MODEL_CLASSES)
def test_retain_grad_hidden_states_attentions(model_class):
    model = build(model_class).train()
    outputs = model(**tester.prepare_inputs(model_class, model.config, labels=True), output_hidden_states=True,
                    output_attentions=True)
    hidden, attention = outputs.hidden_states[0], outputs.attentions[0]
    hidden.retain_grad()
    attention.retain_grad()
    kept = [hidden, attention]
    if model_class is MAEForPreTraining:
        kept += [outputs.decoder_hidden_states[0], outputs.decoder_attentions[0]]
        for tensor in kept[2:]:
            tensor.retain_grad()
    target = outputs.last_hidden_state.sum() if model_class is MAEModel else outputs.loss
    target.backward()
    for tensor in kept:
        assert tensor.grad is not None and tensor.grad.abs().sum() > 0


@pytest.mark.parametrize("model_class", ALL_MODEL_CLASSES)
def test_tuple_and_dict_outputs_agree(model_class):
    model = build(model_class)
    inputs = tester.prepare_inputs(model_class, model.config, labels=True)
    for flags in ({}, {"output_hidden_states": True, "output_attentions": True}):
        as_dict = model(**inputs, **flags)
        as_tuple = model(**inputs, **flags, return_dict=False)
        assert isinstance(as_tuple, tuple)
        expected = as_dict.to_tuple()
        assert len(as_tuple) == len(expected)

        def flatten(values):
            for value in values:
                yield from (flatten(value) if isinstance(value, tuple) else [value])

        for actual, wanted in zip(flatten(as_tuple), flatten(expected), strict=True):
            torch.testing.assert_close(actual, wanted, rtol=0, atol=0)
    tuple_model = model_class(tester.get_config(return_dict=False))
    tuple_model.load_state_dict(model.state_dict())
    assert isinstance(tuple_model.eval()(**inputs), tuple)  # the config's return_dict is honoured


# ---------------------------------------------------------------- attention backends


@pytest.mark.parametrize("model_class", ALL_MODEL_CLASSES)
def test_eager_equals_sdpa_at_load_and_after_switching(tmp_path, model_class):
    model = build(model_class)
    inputs = tester.prepare_inputs(model_class, model.config)
    sdpa = tester.main_output(model_class, model(**inputs))
    model.save_pretrained(tmp_path)
    eager = model_class.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert eager.config._attn_implementation == "eager"
    torch.testing.assert_close(tester.main_output(model_class, eager(**inputs)), sdpa, rtol=1e-5, atol=1e-5)
    model.set_attn_implementation("eager")
    assert model.config._attn_implementation == "eager"
    assert all(module.config._attn_implementation == "eager" for module in model.modules()
               if type(module).__name__ == "MAEAttention")
    torch.testing.assert_close(tester.main_output(model_class, model(**inputs)), sdpa, rtol=1e-5, atol=1e-5)


def test_attention_goes_through_the_attention_interface():
    """A backend registered with transformers' `AttentionInterface` is the one that runs, for every block."""
    calls = []

    def counting_attention(module, query, key, value, attention_mask, **kwargs):
        calls.append(type(module).__name__)
        return eager_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("mae_hf_test_counting", counting_attention)
    try:
        model = build(MAEForPreTraining)
        reference = model(**tester.prepare_inputs(MAEForPreTraining, model.config)).logits
        model.set_attn_implementation("mae_hf_test_counting")
        logits = model(**tester.prepare_inputs(MAEForPreTraining, model.config)).logits
    finally:
        del ALL_ATTENTION_FUNCTIONS._global_mapping["mae_hf_test_counting"]
    config = model.config
    assert calls == ["MAEAttention"] * (config.num_hidden_layers + config.decoder_num_hidden_layers)
    torch.testing.assert_close(logits, reference, rtol=1e-5, atol=1e-5)
    assert model.mae.layers[0].attention.is_causal is False  # or transformers' sdpa/flash would mask causally


@pytest.mark.skipif(not torch.cuda.is_available(), reason="flash and flex attention need a CUDA device")
@pytest.mark.parametrize("implementation", ["flex_attention", "flash_attention_2", "flash_attention_3"])
def test_gpu_attention_backends_match_eager(implementation):
    installed = {"flash_attention_2": is_flash_attn_2_available, "flash_attention_3": is_flash_attn_3_available}
    if implementation in installed and not installed[implementation]():
        pytest.skip(f"{implementation} is not installed")
    model = build(MAEForImageClassification).cuda().to(torch.bfloat16)
    inputs = {k: v.cuda() for k, v in tester.prepare_inputs(MAEForImageClassification, model.config).items()}
    with torch.no_grad():
        eager = model(**inputs).logits.float()
        model.set_attn_implementation(implementation)
        assert model.config._attn_implementation == implementation
        torch.testing.assert_close(model(**inputs).logits.float(), eager, rtol=2e-2, atol=2e-2)


# ---------------------------------------------------------------- construction and loading


@pytest.mark.parametrize("model_class", ALL_MODEL_CLASSES)
def test_meta_device_construction_then_init(model_class):
    config = tester.get_config(drop_path_rate=0.1, linear_probe=model_class is MAEForImageClassification)
    with torch.device("meta"):
        model = model_class(config)
    assert all(p.device.type == "meta" for p in model.parameters())
    encoder = tester.encoder(model)
    assert [layer.drop_path_rate for layer in encoder.layers] == [0.0, 0.1]
    model.to_empty(device="cpu")
    model.init_weights()
    tables = [(encoder.embeddings, config.hidden_size)]
    if model_class is MAEForPreTraining:
        tables.append((model.decoder, config.decoder_hidden_size))
    for module, width in tables:
        assert torch.equal(module.position_embeddings, sincos_position_embedding(tester.grid, width))
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        assert torch.isfinite(tensor).all(), name
    if model_class is MAEForImageClassification:
        assert torch.equal(model.head_norm.running_var, torch.ones(config.hidden_size))
        assert torch.equal(model.head_norm.running_mean, torch.zeros(config.hidden_size))
    reference = build(model_class, drop_path_rate=0.1, linear_probe=model_class is MAEForImageClassification)
    model.load_state_dict(reference.state_dict())
    inputs = tester.prepare_inputs(model_class, config)
    torch.testing.assert_close(tester.main_output(model_class, model.eval()(**inputs)),
                               tester.main_output(model_class, reference(**inputs)), rtol=0, atol=0)


@pytest.mark.parametrize("model_class", ALL_MODEL_CLASSES)
def test_init_weights_can_init_buffers(model_class):
    """transformers 5.25's common test: the buffers of a model built by `__init__` alone (every init function and
    `init_weights` switched off) equal those of one built on the meta device, `to_empty`, then `init_weights()`.
    The sin-cos tables were zeros until `_init_weights` ran."""
    config = tester.get_config(linear_probe=model_class is MAEForImageClassification)
    with no_init_weights():
        from_init = model_class(copy.deepcopy(config))
    with torch.device("meta"):
        from_meta = model_class(copy.deepcopy(config))
    from_meta.to_empty(device="cpu")
    from_meta.init_weights()
    buffers, meta_buffers = dict(from_init.named_buffers()), dict(from_meta.named_buffers())
    assert sorted(buffers) == sorted(meta_buffers)
    assert any("position_embeddings" in name for name in buffers)
    assert [name for name, buffer in buffers.items() if not torch.equal(buffer, meta_buffers[name])] == []
    table = tester.encoder(from_init).embeddings.position_embeddings
    assert torch.equal(table, sincos_position_embedding(tester.grid, config.hidden_size))


@pytest.mark.parametrize("model_class", ALL_MODEL_CLASSES)
def test_all_tensors_are_parameters_or_buffers(model_class):
    """transformers' check that nothing stays on the meta device: built there, moved with `to_empty`, initialised,
    the model runs."""
    config = tester.get_config()
    with torch.device("meta"):
        model = model_class(copy.deepcopy(config)).eval()
    model.to_empty(device="cpu")
    model.init_weights()
    outputs = model(**tester.prepare_inputs(model_class, config, labels=True))
    assert torch.isfinite(tester.main_output(model_class, outputs)).all()


@pytest.mark.parametrize("model_class", ALL_MODEL_CLASSES)
def test_buffers_follow_the_requested_dtype(tmp_path, model_class):
    build(model_class).save_pretrained(tmp_path)
    loaded = model_class.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert {buffer.dtype for name, buffer in loaded.named_buffers() if buffer.is_floating_point()} == {torch.bfloat16}
    torch.set_default_dtype(torch.bfloat16)  # what from_pretrained(dtype=...) sets while it builds the model
    try:
        with torch.device("meta"):
            model = model_class(tester.get_config())
    finally:
        torch.set_default_dtype(torch.float32)
    assert tester.encoder(model).embeddings.position_embeddings.dtype == torch.bfloat16


@pytest.mark.parametrize("model_class", ALL_MODEL_CLASSES)
def test_greyscale_after_the_config_changed(model_class):
    """ViTMAE's greyscale test: a config made for 3 channels, `config.num_channels = 1` afterwards, then a model.
    The normalisation defaults follow the channel count; values the user set do not change silently."""
    config = tester.get_config()
    config.num_channels = 1
    model = model_class(config).eval()
    assert (config.image_mean, config.image_std) == ([0.5], [0.5])
    assert list(model.image_processor().image_mean) == [0.5]
    outputs = model(**tester.prepare_inputs(model_class, config))
    if model_class is MAEForPreTraining:
        assert outputs.logits.shape == (tester.batch_size, tester.num_patches, config.patch_size**2)
    config.num_channels = 3  # and back: CIFAR-10's statistics again
    model_class(config)
    assert (config.image_mean, config.image_std) == (list(CIFAR10_MEAN), list(CIFAR10_STD))
    config.image_mean = None  # unset later: the default too
    config.check()
    assert config.image_mean == list(CIFAR10_MEAN) and type(config.to_dict()["image_mean"]) is list  # saved plain
    loaded = MAEConfig.from_dict(config.to_dict())  # a saved config's values count as given
    loaded.num_channels = 1
    with pytest.raises(ValueError, match="or None for the default"):
        model_class(loaded)
    custom = tester.get_config(image_mean=[0.1, 0.2, 0.3])
    custom.num_channels = 1
    with pytest.raises(ValueError, match=r"invalid image_mean=\[0\.1, 0\.2, 0\.3\]: expected one value per channel"):
        model_class(custom)


@pytest.mark.parametrize("model_class", ALL_MODEL_CLASSES)
def test_save_load_round_trip(tmp_path, model_class):
    model = build(model_class)
    model.save_pretrained(tmp_path)
    loaded = model_class.from_pretrained(tmp_path).eval()
    assert model.state_dict().keys() == loaded.state_dict().keys()
    inputs = tester.prepare_inputs(model_class, model.config)
    assert torch.equal(tester.main_output(model_class, loaded(**inputs)),
                       tester.main_output(model_class, model(**inputs)))


# ---------------------------------------------------------------- training


@pytest.mark.parametrize("model_class", ALL_MODEL_CLASSES)
def test_training_step_reaches_every_parameter_and_lowers_the_loss(model_class):
    model = build(model_class).train()
    inputs = tester.prepare_inputs(model_class, model.config, labels=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)

    def loss():
        outputs = model(**inputs)
        return outputs.pooler_output.pow(2).mean() if model_class is MAEModel else outputs.loss

    first = loss()
    first.backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    optimizer.step()
    optimizer.zero_grad()
    assert loss() < first


@pytest.mark.parametrize("model_class", ALL_MODEL_CLASSES)
def test_gradient_checkpointing_gives_the_same_gradients(model_class):
    plain = build(model_class).train()
    checkpointed = build(model_class).train()
    checkpointed.activation_checkpointing_enable()
    inputs = tester.prepare_inputs(model_class, plain.config, labels=True)
    for model in (plain, checkpointed):
        outputs = model(**inputs, output_attentions=True)  # captured maps too, with checkpointed blocks
        assert len(outputs.attentions) == model.config.num_hidden_layers
        (outputs.last_hidden_state.sum() if model_class is MAEModel else outputs.loss).backward()
    grads = dict(checkpointed.named_parameters())
    for name, param in plain.named_parameters():
        torch.testing.assert_close(grads[name].grad, param.grad, msg=name)


@pytest.mark.parametrize("model_class", ALL_MODEL_CLASSES)
def test_deterministic_by_default(model_class):
    model = build(model_class)
    inputs = tester.prepare_inputs(model_class, model.config)
    if model_class is MAEForPreTraining:
        inputs.pop("noise")
        torch.manual_seed(3)
        first = model(**inputs)
        torch.manual_seed(3)
        assert torch.equal(model(**inputs).logits, first.logits)  # random masking follows the seed
        assert not torch.equal(model(**inputs).mask, first.mask)  # and is random
        return
    first, second = model(**inputs), model(**inputs)
    assert torch.equal(tester.main_output(model_class, first), tester.main_output(model_class, second))
    encoder = tester.encoder(model)
    features = encoder(inputs["pixel_values"])
    assert torch.equal(features.mask, torch.zeros(tester.batch_size, tester.num_patches))  # nothing masked
    # ViTMAE's behaviour (its encoder masks config.mask_ratio of the patches), as the README says:
    masked = encoder(inputs["pixel_values"], mask_ratio=model.config.mask_ratio)
    assert masked.last_hidden_state.shape[1] == tester.encoder_tokens(MAEForPreTraining, model.config)


# ---------------------------------------------------------------- export


@pytest.mark.parametrize("model_class", [MAEModel, MAEForImageClassification])
def test_torch_export_with_dynamic_batch(model_class):
    model = build(model_class)
    inputs = tester.prepare_inputs(model_class, model.config)
    batch = torch.export.Dim("batch", min=1, max=256)
    exported = torch.export.export(model, (), kwargs=inputs, dynamic_shapes={"pixel_values": {0: batch}})
    for size in (1, 5):
        pixels = tester.prepare_inputs(model_class, model.config, batch=size)["pixel_values"]
        with torch.no_grad():
            expected = model(pixels)
        actual = exported.module()(pixel_values=pixels)
        torch.testing.assert_close(tester.main_output(model_class, actual), tester.main_output(model_class, expected),
                                   rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- any image size


@pytest.mark.parametrize("model_class", ALL_MODEL_CLASSES)
@pytest.mark.parametrize("size", [(16, 16), (8, 12), (12, 6)], ids=["2x", "wide", "tall"])
def test_interpolate_pos_encoding_runs_any_divisible_size(model_class, size):
    model = build(model_class)
    config = model.config
    rows, columns = size[0] // config.patch_size, size[1] // config.patch_size
    inputs = tester.prepare_inputs(model_class, config, size=size, labels=True)
    with pytest.raises(ValueError, match="interpolate_pos_encoding=True"):
        model(**inputs)
    outputs = model(**inputs, interpolate_pos_encoding=True, output_hidden_states=True)
    tokens = tester.encoder_tokens(model_class, config, rows * columns)
    assert outputs.hidden_states[0].shape == (tester.batch_size, tokens, config.hidden_size)
    if model_class is MAEForPreTraining:
        assert outputs.logits.shape == (tester.batch_size, rows * columns, config.patch_size**2 * 3)
        assert torch.isfinite(outputs.loss)
        patches = model.patchify(inputs["pixel_values"], interpolate_pos_encoding=True)
        assert torch.equal(model.unpatchify(patches, original_image_size=size), inputs["pixel_values"])
    # The positions are the sin-cos table of that grid, computed once.
    embeddings = tester.encoder(model).embeddings
    table = embeddings.positions((rows, columns))
    assert torch.equal(table, sincos_position_embedding((rows, columns), config.hidden_size))
    assert embeddings.positions((rows, columns)) is table
    # A wide grid's table is the top rows of the square table of its width (same row/column -> same position).
    side = max(rows, columns)
    square = sincos_position_embedding(side, config.hidden_size)[0, 1:].reshape(side, side, -1)
    torch.testing.assert_close(table[0, 1:].reshape(rows, columns, -1), square[:rows, :columns], rtol=0, atol=0)


@pytest.mark.parametrize("model_class", ALL_MODEL_CLASSES)
def test_interpolate_pos_encoding_changes_nothing_at_the_native_size(model_class):
    model = build(model_class)
    inputs = tester.prepare_inputs(model_class, model.config)
    assert torch.equal(tester.main_output(model_class, model(**inputs, interpolate_pos_encoding=True)),
                       tester.main_output(model_class, model(**inputs)))
    embeddings = tester.encoder(model).embeddings
    assert embeddings.positions((tester.grid, tester.grid)) is embeddings.position_embeddings  # no new table
    assert embeddings.other_grids == {}


@pytest.mark.parametrize("bad_size", [(9, 8), (8, 7), (0, 8)])
def test_interpolate_pos_encoding_refuses_sizes_the_patch_size_does_not_divide(bad_size):
    model = build(MAEModel)
    with pytest.raises(ValueError, match="multiples of patch_size=2"):
        model(torch.randn(1, 3, *bad_size), interpolate_pos_encoding=True)


@pytest.mark.parametrize("model_class", ALL_MODEL_CLASSES)
def test_from_pretrained_at_another_image_size(tmp_path, model_class):
    model = build(model_class)
    model.save_pretrained(tmp_path / "8px")
    bigger = model_class.from_pretrained(tmp_path / "8px", image_size=16).eval()
    assert bigger.config.image_size == 16
    encoder = tester.encoder(bigger)
    assert torch.equal(encoder.embeddings.position_embeddings, sincos_position_embedding(8, bigger.config.hidden_size))
    inputs = tester.prepare_inputs(model_class, bigger.config)
    assert inputs["pixel_values"].shape[-1] == 16
    torch.testing.assert_close(tester.main_output(model_class, bigger(**inputs)),
                               tester.main_output(model_class, model(**inputs, interpolate_pos_encoding=True)),
                               rtol=0, atol=0)
    bigger.save_pretrained(tmp_path / "16px")
    processor = json.loads((tmp_path / "16px" / "preprocessor_config.json").read_text())
    assert processor["size"] == {"height": 16, "width": 16}
    assert json.loads((tmp_path / "16px" / "config.json").read_text())["image_size"] == 16


# ---------------------------------------------------------------- any image size, through the scripts


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory):
    """A pretraining checkpoint at the tiny size (8 px, like CIFAR-10's 32 px for the real model)."""
    folder = tmp_path_factory.mktemp("checkpoint_8px")
    build(MAEForPreTraining).save_pretrained(folder)
    return folder


def saved_image_size(folder) -> tuple[int, dict]:
    config = json.loads((folder / "config.json").read_text())
    processor = json.loads((folder / "preprocessor_config.json").read_text())
    return config["image_size"], processor["size"]


DOUBLE = ["--config_overrides", "image_size=16", "--disable_tqdm", "true"]


def test_finetune_at_twice_the_pretraining_size(tmp_path, scripts, parquet_folder, small_checkpoint):
    out = tmp_path / "finetune"
    scripts.finetune.main(["--model_name_or_path", str(small_checkpoint), "--output_dir", str(out),
                           "--dataset_name", str(parquet_folder), "--num_train_epochs", "1",
                           "--per_device_train_batch_size", "16", *DOUBLE])
    assert saved_image_size(out) == (16, {"height": 16, "width": 16})
    model = MAEForImageClassification.from_pretrained(out)
    assert torch.equal(model.mae.embeddings.position_embeddings, sincos_position_embedding(8, 16))
    assert 0 <= json.loads((out / "finetune_results.json").read_text())["eval_accuracy"] <= 1


def test_linear_probe_at_twice_the_pretraining_size(tmp_path, scripts, parquet_folder, small_checkpoint):
    out = tmp_path / "probe"
    scripts.linear_probe.main(["--model_name_or_path", str(small_checkpoint), "--output_dir", str(out),
                               "--dataset_name", str(parquet_folder), "--probe_epochs", "2", "--knn", "false",
                               *DOUBLE[:2]])
    assert 0 <= json.loads((out / "linear_probe_results.json").read_text())["eval_accuracy"] <= 1
    assert saved_image_size(out) == (16, {"height": 16, "width": 16})  # the probe model saved beside the results


def test_pretraining_at_twice_the_size_from_a_smaller_checkpoint(tmp_path, scripts, parquet_folder,
                                                                 small_checkpoint):
    out = tmp_path / "pretrain"
    scripts.pretrain.main(["--model_name_or_path", str(small_checkpoint), "--output_dir", str(out),
                           "--dataset_name", str(parquet_folder), "--num_train_epochs", "1",
                           "--per_device_train_batch_size", "16", "--knn_eval", "false", *DOUBLE])
    assert saved_image_size(out) == (16, {"height": 16, "width": 16})
    model = MAEForPreTraining.from_pretrained(out)
    pixels = torch.randn(2, 3, 16, 16)
    assert model(pixels).logits.shape == (2, 64, 12)
    start = MAEForPreTraining.from_pretrained(small_checkpoint)
    assert not torch.equal(model.mae.layers[0].mlp.fc1.weight, start.mae.layers[0].mlp.fc1.weight)  # it trained

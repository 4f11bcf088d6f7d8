"""Conversion between `transformers.ViTMAEForPreTraining` and `MAEForPreTraining`.

The two compute the same function; only parameter layout differs: ViTMAE projects patches with a Conv2d and has
separate q/k/v projections, we project patchified pixels with a Linear and fuse q/k/v into one matrix. Position
embeddings are fixed sin-cos tables in both, recomputed here from the config, so they are checked, not copied.
"""

import torch
from einops import rearrange
from transformers import ViTMAEConfig, ViTMAEForPreTraining

from .configuration_mae import MAEConfig
from .modeling_mae import MAEForPreTraining

# Config fields with the same name and meaning in both.
SHARED_FIELDS = (
    "image_size", "patch_size", "num_channels", "hidden_size", "num_hidden_layers", "num_attention_heads",
    "decoder_hidden_size", "decoder_num_hidden_layers", "decoder_num_attention_heads", "mask_ratio",
    "norm_pix_loss", "qkv_bias", "hidden_act", "layer_norm_eps", "initializer_range", "hidden_dropout_prob",
    "attention_probs_dropout_prob",
)

# Ours only, kept in a converted ViTMAE config (which ignores them) so that converting back restores them.
CARRIED_FIELDS = ("pooling", "drop_path_rate", "image_mean", "image_std")

# Per block: (our name, ViTMAE's name), for parameters whose tensors are identical.
BLOCK_PARAMS = (
    ("norm1", "layernorm_before"), ("norm2", "layernorm_after"), ("attention.proj", "attention.o_proj"),
    ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2"),
)


def config_from_vit_mae(config: ViTMAEConfig) -> MAEConfig:
    for field in ("image_size", "patch_size"):
        if not isinstance(getattr(config, field), int):
            raise ValueError(f"Only square images and patches convert: ViTMAEConfig.{field}={getattr(config, field)}.")
    return MAEConfig(**{field: getattr(config, field) for field in SHARED_FIELDS + CARRIED_FIELDS
                        if hasattr(config, field)},
                     mlp_ratio=config.intermediate_size / config.hidden_size,
                     decoder_mlp_ratio=config.decoder_intermediate_size / config.decoder_hidden_size)


def config_to_vit_mae(config: MAEConfig) -> ViTMAEConfig:
    return ViTMAEConfig(**{field: getattr(config, field) for field in SHARED_FIELDS + CARRIED_FIELDS},
                        intermediate_size=config.intermediate_size,
                        decoder_intermediate_size=config.decoder_intermediate_size)


def _blocks(config: MAEConfig):
    """(our block prefix, ViTMAE's) of every block, encoder then decoder."""
    for i in range(config.num_hidden_layers):
        yield f"mae.layers.{i}", f"vit.layers.{i}"
    for i in range(config.decoder_num_hidden_layers):
        yield f"decoder.layers.{i}", f"decoder.decoder_layers.{i}"


def _direct_pairs(config: MAEConfig):
    yield "mae.embeddings.cls_token", "vit.embeddings.cls_token"
    yield "mae.embeddings.patch_projection.bias", "vit.embeddings.patch_embeddings.projection.bias"
    yield "decoder.mask_token", "decoder.mask_token"
    for kind in ("weight", "bias"):
        yield f"mae.norm.{kind}", f"vit.layernorm.{kind}"
        yield f"decoder.embed.{kind}", f"decoder.decoder_embed.{kind}"
        yield f"decoder.norm.{kind}", f"decoder.decoder_norm.{kind}"
        yield f"decoder.pred.{kind}", f"decoder.decoder_pred.{kind}"
        for prefix, vit_prefix in _blocks(config):
            for ours, theirs in BLOCK_PARAMS:
                yield f"{prefix}.{ours}.{kind}", f"{vit_prefix}.{theirs}.{kind}"


def _qkv_pairs(config: MAEConfig):
    """(our fused q/k/v parameter, ViTMAE's three separate ones) per block."""
    for prefix, vit_prefix in _blocks(config):
        for kind in ("weight", "bias") if config.qkv_bias else ("weight",):
            yield f"{prefix}.attention.qkv.{kind}", [f"{vit_prefix}.attention.{name}_proj.{kind}" for name in "qkv"]


def from_vit_mae(model: ViTMAEForPreTraining) -> MAEForPreTraining:
    """An `MAEForPreTraining` computing the same function as the given ViTMAE model (fp32 weights copied)."""
    config = config_from_vit_mae(model.config)
    ours = MAEForPreTraining(config)
    theirs = model.state_dict()
    state = {key: theirs[vit_key] for key, vit_key in _direct_pairs(config)}
    # our patchify flattens a patch as (row, column, channel)
    state["mae.embeddings.patch_projection.weight"] = rearrange(
        theirs["vit.embeddings.patch_embeddings.projection.weight"], "d c p q -> d (p q c)")
    for key, vit_keys in _qkv_pairs(config):
        state[key] = torch.cat([theirs[vit_key] for vit_key in vit_keys])
    for ours_table, vit_key in ((ours.mae.embeddings.position_embeddings, "vit.embeddings.position_embeddings"),
                                (ours.decoder.position_embeddings, "decoder.decoder_pos_embed")):
        stored = theirs[vit_key]
        # Compared at the precision the checkpoint stores it in (a bf16 checkpoint holds the table rounded).
        difference = (ours_table.to(stored.dtype).float() - stored.float().cpu()).abs().max().item()
        if difference > (1e-5 if stored.dtype == torch.float32 else torch.finfo(stored.dtype).eps):
            raise ValueError(
                f"{vit_key} is not the fixed 2D sin-cos table (largest difference {difference:.3g}), so the model "
                "cannot be converted exactly. (A ViTMAEForPreTraining built from a config by transformers 5.x leaves "
                "this table at zero; published checkpoints hold the sin-cos table.)"
            )
    ours.load_state_dict(state, strict=True)
    reference = next(model.parameters())
    return ours.to(reference.device, reference.dtype)


def to_vit_mae(model: MAEForPreTraining) -> ViTMAEForPreTraining:
    """A `transformers.ViTMAEForPreTraining` computing the same function as the given model."""
    config = model.config
    theirs = ViTMAEForPreTraining(config_to_vit_mae(config))
    ours = model.state_dict()
    state = {vit_key: ours[key] for key, vit_key in _direct_pairs(config)}
    state["vit.embeddings.patch_embeddings.projection.weight"] = rearrange(
        ours["mae.embeddings.patch_projection.weight"], "d (p q c) -> d c p q", p=config.patch_size,
        q=config.patch_size)
    for key, vit_keys in _qkv_pairs(config):
        state.update(zip(vit_keys, ours[key].chunk(3)))
    state["vit.embeddings.position_embeddings"] = model.mae.embeddings.position_embeddings
    state["decoder.decoder_pos_embed"] = model.decoder.position_embeddings
    theirs.load_state_dict(state, strict=True)
    reference = next(model.parameters())
    return theirs.to(reference.device, reference.dtype)

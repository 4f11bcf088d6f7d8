"""Configuration of the masked autoencoder (MAE) models.

This file is copied next to saved weights and must import nothing from `mae_hf`.
"""

from transformers import PreTrainedConfig
from transformers.activations import ACT2FN

# Per-channel statistics of the CIFAR-10 training split (images scaled to [0, 1]).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)

AUTO_MAP = {"AutoConfig": "configuration_mae.MAEConfig", "AutoModel": "modeling_mae.MAEModel",
            "AutoModelForPreTraining": "modeling_mae.MAEForPreTraining",
            "AutoModelForImageClassification": "modeling_mae.MAEForImageClassification"}


class DefaultStatistics(list):
    """An image_mean / image_std the config chose by channel count, not one the user gave: it follows `num_channels`
    when that changes later. Saved as a plain list (a loaded config's values count as given)."""


# The fraction of patches hidden from the encoder that each use accepts: the encoder may see every patch (features);
# pretraining learns from the masked patches only. In either, some patch must stay visible.
MASK_RATIO_RULES = {
    "encoder": (lambda ratio: 0 <= ratio < 1, "must lie in [0, 1)"),
    "pretraining": (lambda ratio: 0 < ratio < 1,
                    "pretraining needs mask_ratio in (0, 1), as its loss is over the masked patches (mask_ratio > 0)"),
}


def mask_ratio_problem(mask_ratio: float, num_patches: int | None = None, use: str = "encoder") -> str | None:
    """What is wrong with `mask_ratio` for `use` (a `MASK_RATIO_RULES` key) on `num_patches` patches, or None."""
    holds, rule = MASK_RATIO_RULES[use]
    if not holds(mask_ratio):
        return rule
    if num_patches is not None and int(num_patches * (1 - mask_ratio)) < 1:
        return f"leaves no visible patch out of {num_patches}"
    return None


class MAEConfig(PreTrainedConfig):
    r"""
    Configuration of a ViT masked autoencoder. The defaults are the small CIFAR-10 model (32 px images, patch 2,
    width 192, 12 encoder and 4 decoder layers, 3 heads, mask ratio 0.75; about 7.2M parameters).

    Args:
        image_size (`int`): Side of the (square) input image in pixels.
        patch_size (`int`): Side of a square patch; must divide `image_size`.
        num_channels (`int`): Input channels.
        hidden_size (`int`): Encoder width; divisible by `num_attention_heads` and by 4 (2D sin-cos positions).
        num_hidden_layers (`int`): Encoder blocks.
        num_attention_heads (`int`): Encoder attention heads.
        mlp_ratio (`float`): Width of the encoder MLP relative to `hidden_size`.
        decoder_hidden_size, decoder_num_hidden_layers, decoder_num_attention_heads, decoder_mlp_ratio:
            The same for the decoder, which only `MAEForPreTraining` has.
        mask_ratio (`float`): Fraction of patches hidden from the encoder during pretraining, in [0, 1).
        norm_pix_loss (`bool`): Regress per-patch normalised pixels (MAE paper, Table 3) instead of raw ones.
        qkv_bias (`bool`): Bias in the query/key/value projections.
        hidden_act (`str`): MLP activation, any name in `transformers.activations.ACT2FN`.
        layer_norm_eps (`float`): Epsilon of every LayerNorm.
        initializer_range (`float`): Std of the normal init of the class and mask tokens.
        hidden_dropout_prob, attention_probs_dropout_prob (`float`): Dropout after attention/MLP, on attention weights.
        drop_path_rate (`float`): Stochastic depth, rising linearly to this value over the encoder blocks.
        pooling (`str`): `"cls"` (class token) or `"mean"` (mean of patch tokens) for `pooler_output` and classifiers.
        linear_probe (`bool`): `MAEForImageClassification` freezes the encoder (always in eval mode, no gradients)
            and puts a BatchNorm without affine parameters before the linear head, as in the MAE paper's linear probe.
        image_mean, image_std (`list[float]`, `float` or `None`): Per-channel normalisation used by the image
            processor (`(pixel / 255 - mean) / std`): one number for every channel (as `ViTImageProcessor`), or a list
            of one per channel; every std positive, tiny ones included (docs/models.md, "Construction anywhere").
            `None` (the default): CIFAR-10's training statistics for 3 channels, 0.5 / 0.5 otherwise; these defaults
            follow `num_channels` when it changes later, values the user gave never change.

    Attention maps (`output_attentions=True`, here or in `forward`) are computed with the eager formula; the config's
    `attn_implementation` (default `sdpa`) is used whenever they are not requested.
    """

    model_type = "mae_hf"

    image_size: int = 32
    patch_size: int = 2
    num_channels: int = 3
    hidden_size: int = 192
    num_hidden_layers: int = 12
    num_attention_heads: int = 3
    mlp_ratio: float = 4.0
    decoder_hidden_size: int = 192
    decoder_num_hidden_layers: int = 4
    decoder_num_attention_heads: int = 3
    decoder_mlp_ratio: float = 4.0
    mask_ratio: float = 0.75
    norm_pix_loss: bool = False
    qkv_bias: bool = True
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-6
    initializer_range: float = 0.02
    hidden_dropout_prob: float = 0.0
    attention_probs_dropout_prob: float = 0.0
    drop_path_rate: float = 0.0
    pooling: str = "cls"
    linear_probe: bool = False
    image_mean: list[float] | tuple[float, ...] | float | None = None
    image_std: list[float] | tuple[float, ...] | float | None = None

    def __post_init__(self, **kwargs):
        kwargs.setdefault("auto_map", dict(AUTO_MAP))
        super().__post_init__(**kwargs)
        self.check()  # also fills the default image_mean / image_std

    def to_dict(self) -> dict:
        output = super().to_dict()
        for field in ("image_mean", "image_std"):  # a DefaultStatistics is saved as the plain list it is
            if isinstance(output.get(field), DefaultStatistics):
                output[field] = list(output[field])
        return output

    @property
    def grid_size(self) -> int:
        """Patches along each side of the image."""
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    @property
    def num_visible_patches(self) -> int:
        """Patches the encoder sees during pretraining."""
        return int(self.num_patches * (1 - self.mask_ratio))

    @property
    def intermediate_size(self) -> int:
        return int(round(self.hidden_size * self.mlp_ratio))

    @property
    def decoder_intermediate_size(self) -> int:
        return int(round(self.decoder_hidden_size * self.decoder_mlp_ratio))

    def check(self):
        """Raise `ValueError` naming the field when the configuration cannot describe a working model. Also fills
        `image_mean` / `image_std` left unset (or chosen for another channel count) with the default of
        `num_channels`, and turns a single number into one value per channel."""

        def fail(field, why):
            raise ValueError(f"MAEConfig: invalid {field}={getattr(self, field)!r}: {why}.")

        def is_number(value) -> bool:
            return isinstance(value, (int, float)) and not isinstance(value, bool)

        for field in ("image_size", "patch_size", "num_channels", "hidden_size", "num_hidden_layers",
                      "num_attention_heads", "decoder_hidden_size", "decoder_num_hidden_layers",
                      "decoder_num_attention_heads"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                fail(field, "expected a positive integer")
        for field in ("mlp_ratio", "decoder_mlp_ratio", "mask_ratio", "layer_norm_eps", "initializer_range",
                      "hidden_dropout_prob", "attention_probs_dropout_prob", "drop_path_rate"):
            if not is_number(getattr(self, field)):
                fail(field, "expected a number")
        if self.image_size % self.patch_size:
            fail("image_size", f"must be divisible by patch_size={self.patch_size}")
        for prefix in ("", "decoder_"):
            width, heads = getattr(self, prefix + "hidden_size"), getattr(self, prefix + "num_attention_heads")
            if width % heads:
                fail(prefix + "hidden_size", f"must be divisible by {prefix}num_attention_heads={heads}")
            if width % 4:
                fail(prefix + "hidden_size", "must be divisible by 4 for the 2D sin-cos position embedding")
            if getattr(self, prefix + "mlp_ratio") <= 0:
                fail(prefix + "mlp_ratio", "must be positive")
        problem = mask_ratio_problem(self.mask_ratio, self.num_patches)
        if problem:
            fail("mask_ratio", problem)
        for field in ("hidden_dropout_prob", "attention_probs_dropout_prob", "drop_path_rate"):
            if not 0 <= getattr(self, field) < 1:
                fail(field, "must lie in [0, 1)")
        if self.hidden_act not in ACT2FN:
            fail("hidden_act", f"expected one of {sorted(ACT2FN)}")
        if self.pooling not in ("cls", "mean"):
            fail("pooling", "expected 'cls' or 'mean'")
        for field, cifar10 in (("image_mean", CIFAR10_MEAN), ("image_std", CIFAR10_STD)):
            value = getattr(self, field)
            if value is None or (isinstance(value, DefaultStatistics) and len(value) != self.num_channels):
                value = DefaultStatistics(cifar10 if self.num_channels == 3 else [0.5] * self.num_channels)
            if is_number(value):
                value = [value] * self.num_channels  # one number for every channel
            if not isinstance(value, (list, tuple)) or not all(map(is_number, value)):
                fail(field, "expected a number or a list of numbers, one per channel")
            if len(value) != self.num_channels:
                fail(field, f"expected one value per channel (num_channels={self.num_channels}); pass image_mean "
                            f"and image_std with {self.num_channels} value(s) each, a single number, or None for the "
                            "default")
            setattr(self, field, (DefaultStatistics if isinstance(value, DefaultStatistics) else list)(
                float(v) for v in value))
        if any(v <= 0 for v in self.image_std):
            fail("image_std", "every value must be positive")

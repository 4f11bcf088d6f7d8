"""Masked autoencoder (He et al., "Masked Autoencoders Are Scalable Vision Learners") as Transformers models.

The outline of the code is the outline of the method:
patchify -> random masking -> encoder -> decoder -> mean squared error on the masked patches.

This file is copied next to saved weights, so that `trust_remote_code=True` loads a model without `mae_hf`
installed: it imports `mae_hf` code only relatively, and needs nothing beyond torch and transformers.
"""

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel, ViTImageProcessorPil
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.image_utils import PILImageResampling
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import ImageClassifierOutput
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.processing_utils import Unpack
from transformers.utils import ModelOutput, TransformersKwargs, logging
from transformers.utils.generic import can_return_tuple
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

from .configuration_mae import MAEConfig, mask_ratio_problem

logger = logging.get_logger(__name__)


@dataclass
class MAEModelOutput(ModelOutput):
    """
    last_hidden_state: `(batch, 1 + kept patches, hidden_size)`, class token first; all patches unless masked.
    pooler_output: `(batch, hidden_size)`, the class token or the mean of the patch tokens (`config.pooling`).
    mask: `(batch, num_patches)`, 1 where a patch was hidden from the encoder, in image order.
    ids_restore: `(batch, num_patches)`, the permutation that puts the shuffled patches back in image order.
    hidden_states: with `output_hidden_states=True`, the embeddings and the output of each block (before the final
        LayerNorm), each `(batch, 1 + kept patches, hidden_size)`.
    attentions: with `output_attentions=True`, one `(batch, heads, tokens, tokens)` softmax map per block.
    """

    last_hidden_state: torch.FloatTensor | None = None
    pooler_output: torch.FloatTensor | None = None
    mask: torch.FloatTensor | None = None
    ids_restore: torch.LongTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


@dataclass
class MAEDecoderOutput(ModelOutput):
    """logits: `(batch, num_patches, patch_size**2 * num_channels)`; hidden_states and attentions of the decoder."""

    logits: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


@dataclass
class MAEForPreTrainingOutput(ModelOutput):
    """
    loss: mean squared error over the masked patches.
    logits: `(batch, num_patches, patch_size**2 * num_channels)`, the predicted patches in image order
        (normalised per patch when `config.norm_pix_loss`).
    mask, ids_restore, hidden_states, attentions: as in `MAEModelOutput` (of the encoder).
    decoder_hidden_states, decoder_attentions: the same for the decoder (all `1 + num_patches` tokens), with
        `output_hidden_states` / `output_attentions`.
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    mask: torch.FloatTensor | None = None
    ids_restore: torch.LongTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    decoder_hidden_states: tuple[torch.FloatTensor, ...] | None = None
    decoder_attentions: tuple[torch.FloatTensor, ...] | None = None


def follow_umask(path: str) -> None:
    """Give `path` the permissions a newly created file gets (0666 less the umask). safetensors writes through a
    private temporary file (0600), which would leave the weights unreadable by the other users of a shared
    machine while every other file of the folder is readable."""
    umask = os.umask(0)
    os.umask(umask)  # read without changing it: the only portable way
    os.chmod(path, 0o666 & ~umask)


def sincos_position_embedding(grid_size: int | tuple[int, int], dim: int) -> torch.Tensor:
    """Fixed 2D sin-cos embedding of a patch grid (`grid_size` = side of a square grid, or `(rows, columns)`),
    shape `(1, 1 + rows * columns, dim)`, patches in row-major order.

    Row 0 (the class token) is zero. Each patch gets `[sin(x w) | cos(x w) | sin(y w) | cos(y w)]` with x its column,
    y its row and w = 10000**(-k / (dim/4)): the layout of the original MAE code and of ViTMAE's checkpoints.
    """
    num_rows, num_columns = (grid_size, grid_size) if isinstance(grid_size, int) else grid_size
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    rows, cols = torch.meshgrid(torch.arange(num_rows, dtype=torch.float64),
                                torch.arange(num_columns, dtype=torch.float64), indexing="ij")
    x = cols.reshape(-1, 1) * omega
    y = rows.reshape(-1, 1) * omega
    table = torch.cat([x.sin(), x.cos(), y.sin(), y.cos()], dim=1)
    return torch.cat([table.new_zeros(1, dim), table]).float().unsqueeze(0)


def random_masking(tokens: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None):
    """Keep a random `1 - mask_ratio` of each sample's tokens: the lowest `noise` values win (argsort, no loop).

    Returns the kept tokens (in shuffled order), the mask (1 = removed, image order) and `ids_restore`.
    """
    batch, length, dim = tokens.shape
    problem = mask_ratio_problem(mask_ratio, length)
    if problem:
        raise ValueError(f"invalid mask_ratio={mask_ratio}: {problem}.")
    num_keep = int(length * (1 - mask_ratio))
    if noise is not None and noise.shape != (batch, length):
        raise ValueError(f"noise must have shape (batch, num_patches) = {(batch, length)}, got {tuple(noise.shape)}.")
    if num_keep == length:  # nothing to hide: keep image order, so features are deterministic
        ids_restore = torch.arange(length, device=tokens.device).expand(batch, -1)
        return tokens, tokens.new_zeros(batch, length, dtype=torch.float32), ids_restore
    if noise is None:
        noise = torch.rand(batch, length, device=tokens.device)
    ids_shuffle = torch.argsort(noise.to(tokens.device), dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    kept = torch.gather(tokens, 1, ids_shuffle[:, :num_keep, None].expand(-1, -1, dim))
    mask = (ids_restore >= num_keep).float()
    return kept, mask, ids_restore


def drop_path(x: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
    """Stochastic depth: drop the whole residual branch for a random subset of samples."""
    if rate == 0.0 or not training:
        return x
    keep = x.new_empty(x.shape[0], *(1,) * (x.dim() - 1)).bernoulli_(1 - rate)
    return x * keep / (1 - rate)


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention written out: `softmax(q k^T * scaling) v`.

    Takes `(batch, heads, tokens, head_dim)` tensors and returns the output as `(batch, tokens, heads, head_dim)`
    (the layout of transformers' attention functions) and the `(batch, heads, tokens, tokens)` weights.
    """
    scores = torch.matmul(query, key.transpose(-2, -1)) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask
    # In the scores' dtype: torch's softmax kernels already compute bf16 and float16 in float32 and round only the
    # output, so an explicit float32 softmax gives the same weights at the cost of a float32 copy of them (on a CPU in
    # bf16 that nearly doubled the time of a 257-token attention's forward and backward).
    weights = scores.softmax(dim=-1)
    output = torch.matmul(nn.functional.dropout(weights, p=dropout, training=module.training), value)
    return output.transpose(1, 2).contiguous(), weights


CPU_BF16_FORMULA_MAX_TOKENS = 577  # measured: the formula trains faster up to 577 tokens (24 x 24 + 1), slower from 769


class MAEAttention(nn.Module):
    """Multi-head self-attention over all tokens (no mask), computed by the backend `config._attn_implementation`
    names (`sdpa` by default, `eager`, `flash_attention_2`, `flex_attention`, ...), through transformers' attention
    interface, so that `attn_implementation=` at load time and `set_attn_implementation` afterwards choose it."""

    def __init__(self, width: int, heads: int, config: MAEConfig):
        super().__init__()
        self.config = config
        self.heads = heads
        self.head_dim = width // heads
        self.scaling = self.head_dim**-0.5
        self.dropout = config.attention_probs_dropout_prob
        self.is_causal = False  # transformers' sdpa and flash functions treat a module without it as causal
        self.qkv = nn.Linear(width, 3 * width, bias=config.qkv_bias)
        self.proj = nn.Linear(width, width)

    def forward(
        self, x: torch.Tensor, **kwargs: Unpack[TransformersKwargs]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:  # output, weights (None unless the backend computes them)
        batch, length, width = x.shape
        # unbind (not permute + unpack): backward then writes the fused q/k/v gradient without an extra copy.
        q, k, v = (t.transpose(1, 2) for t in self.qkv(x).view(batch, length, 3, self.heads, -1).unbind(2))
        attention = self.attention_function(q, kwargs.get("output_attentions"))
        output, weights = attention(self, q, k, v, None, scaling=self.scaling,
                                    dropout=self.dropout if self.training else 0.0, **kwargs)
        return self.proj(output.reshape(batch, length, width)), weights

    def attention_function(self, query: torch.Tensor, output_attentions: bool | None) -> Callable:
        """The backend of `config._attn_implementation`, except: the eager formula when the weights are asked for
        (only it computes them), and when training with `sdpa` in bf16 on a CPU with at most
        `CPU_BF16_FORMULA_MAX_TOKENS` tokens: there torch's flash-attention kernel trains 1.8-11x slower than the
        formula's matrix products (docs/cpu_speed.md); longer sequences, inference and fp32 keep sdpa's kernel."""
        implementation = self.config._attn_implementation
        if output_attentions or (
                implementation == "sdpa" and query.device.type == "cpu" and query.dtype == torch.bfloat16
                and query.requires_grad and query.shape[2] <= CPU_BF16_FORMULA_MAX_TOKENS):
            return eager_attention_forward
        return ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager_attention_forward)


class MAEMLP(nn.Module):
    def __init__(self, width: int, inner: int, config: MAEConfig):
        super().__init__()
        self.fc1 = nn.Linear(width, inner)
        self.act = ACT2FN[config.hidden_act]
        self.fc2 = nn.Linear(inner, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class MAELayer(GradientCheckpointingLayer):
    """Pre-norm transformer block."""

    def __init__(self, width: int, heads: int, inner: int, config: MAEConfig, drop_path_rate: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=config.layer_norm_eps)
        self.attention = MAEAttention(width, heads, config)
        self.norm2 = nn.LayerNorm(width, eps=config.layer_norm_eps)
        self.mlp = MAEMLP(width, inner, config)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.drop_path_rate = drop_path_rate

    def forward(self, x: torch.Tensor, **kwargs: Unpack[TransformersKwargs]) -> torch.Tensor:
        attended, _ = self.attention(self.norm1(x), **kwargs)  # the weights reach outputs through a hook
        x = x + drop_path(self.dropout(attended), self.drop_path_rate, self.training)
        return x + drop_path(self.dropout(self.mlp(self.norm2(x))), self.drop_path_rate, self.training)


class SinCosPositions(nn.Module):
    """Holds the fixed sin-cos table of the config's patch grid and makes those of other grids.

    The table of the config's grid is a non-persistent buffer (derived from the config, so not saved), computed in
    `__init__` and again by `_init_weights`, so that a model built normally and one built on the meta device then
    initialised (`to_empty` + `init_weights`, as `from_pretrained` does) hold the same table. A table for another grid
    (`interpolate_pos_encoding=True`) is computed once per grid, device and dtype and kept: there is nothing to
    interpolate, the sin-cos formula holds for any grid.
    """

    def init_positions(self, grid: tuple[int, int], width: int) -> None:
        """Called by the subclass's `__init__` (a method, not `__init__`: the decoder is also a `PreTrainedModel`)."""
        self.grid = grid
        table = sincos_position_embedding(grid, width).to(torch.get_default_dtype())  # the dtype a load asked for
        self.register_buffer("position_embeddings", table, persistent=False)
        self.other_grids: dict[tuple, torch.Tensor] = {}  # insertion-ordered: the oldest goes first

    MAX_OTHER_GRIDS = 8

    def positions(self, grid: tuple[int, int]) -> torch.Tensor:
        """`(1, 1 + rows * columns, width)` table for a `(rows, columns)` grid."""
        table = self.position_embeddings
        if grid == self.grid:
            return table
        key = (grid, table.device, table.dtype)
        if key not in self.other_grids:
            if len(self.other_grids) >= self.MAX_OTHER_GRIDS:  # many sizes or devices: forget the oldest table
                del self.other_grids[next(iter(self.other_grids))]
            self.other_grids[key] = sincos_position_embedding(grid, table.shape[-1]).to(table.device, table.dtype)
        return self.other_grids[key]


class MAEEmbeddings(SinCosPositions):
    """Patch projection + fixed positions, random masking, then the class token in front."""

    def __init__(self, config: MAEConfig):
        super().__init__()
        self.init_positions((config.grid_size, config.grid_size), config.hidden_size)
        self.patch_projection = nn.Linear(config.patch_size**2 * config.num_channels, config.hidden_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.hidden_size))

    def forward(self, patches: torch.Tensor, grid: tuple[int, int], mask_ratio: float,
                noise: torch.Tensor | None = None):
        positions = self.positions(grid)
        # inputs of any float dtype: compute in the weights' dtype (fp32 images into a bf16 model, and so on)
        tokens = self.patch_projection(patches.to(self.patch_projection.weight.dtype)) + positions[:, 1:]
        tokens, mask, ids_restore = random_masking(tokens, mask_ratio, noise)
        cls = (self.cls_token + positions[:, :1]).expand(tokens.shape[0], -1, -1)
        return torch.cat([cls, tokens], dim=1), mask, ids_restore


class MAEPreTrainedModel(PreTrainedModel):
    config_class = MAEConfig
    base_model_prefix = "mae"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _no_split_modules = ("MAELayer", "MAEEmbeddings")
    # The encoder's; the decoder has its own (see MAEDecoder).
    _can_record_outputs = {"hidden_states": MAELayer, "attentions": MAEAttention}

    def __init__(self, config: MAEConfig, *args, **kwargs):
        config.check()  # also after from_pretrained(..., some_field=value) or attribute changes
        super().__init__(config, *args, **kwargs)

    def _init_weights(self, module):
        # As the MAE paper: xavier-uniform linears (the patch projection included), N(0, 0.02) class/mask tokens.
        if module is getattr(self, "classifier", None):
            # MAE paper: a small init for the head (0.01 for the linear probe, 2e-5 for fine-tuning).
            init.trunc_normal_(module.weight, std=0.01 if self.config.linear_probe else 2e-5)
            init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            init.xavier_uniform_(module.weight)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm1d):
            init.zeros_(module.running_mean)
            init.ones_(module.running_var)
            init.zeros_(module.num_batches_tracked)
        if isinstance(module, SinCosPositions):
            init.copy_(module.position_embeddings,
                       sincos_position_embedding(module.grid, module.position_embeddings.shape[-1]))
            module.other_grids.clear()
            token = module.cls_token if isinstance(module, MAEEmbeddings) else module.mask_token
            init.normal_(token, std=self.config.initializer_range)

    def patch_grid(self, pixel_values, interpolate_pos_encoding: bool | None = False) -> tuple[int, int]:
        """`(rows, columns)` of patches in `pixel_values`, after checking them: the config's image size, or with
        `interpolate_pos_encoding` any height and width divisible by the patch size."""
        config = self.config
        if interpolate_pos_encoding:
            expected = f"(batch, {config.num_channels}, height, width) with height and width multiples of " \
                       f"patch_size={config.patch_size}"
        else:
            expected = f"(batch, {config.num_channels}, {config.image_size}, {config.image_size})"
        if not isinstance(pixel_values, torch.Tensor):
            raise ValueError(f"pixel_values must be a torch.Tensor of shape {expected}, got {type(pixel_values)}.")
        if not pixel_values.is_floating_point():
            raise ValueError(
                f"pixel_values must be floating point of shape {expected} (normalised images, e.g. from the image "
                f"processor), got {pixel_values.dtype}. Convert uint8 images with the model's image processor."
            )
        if pixel_values.dim() == 4 and pixel_values.shape[0] == 0:
            raise ValueError(f"pixel_values is an empty batch; expected {expected} with at least one image.")
        if pixel_values.dim() != 4 or pixel_values.shape[1] != config.num_channels:
            raise ValueError(f"pixel_values must have shape {expected}, got {tuple(pixel_values.shape)}.")
        height, width = pixel_values.shape[2:]
        if interpolate_pos_encoding:
            if height % config.patch_size or width % config.patch_size or not height or not width:
                raise ValueError(f"pixel_values must have shape {expected}, got {tuple(pixel_values.shape)}. Crop or "
                                 f"resize the images to a multiple of {config.patch_size} pixels.")
        elif (height, width) != (config.image_size, config.image_size):
            raise ValueError(
                f"pixel_values must have shape {expected}, got {tuple(pixel_values.shape)}. Resize images to "
                f"{config.image_size}x{config.image_size} with {config.num_channels} channels (the image processor "
                "does this), or pass interpolate_pos_encoding=True to run the model at their size."
            )
        return height // config.patch_size, width // config.patch_size

    def patchify(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool | None = False) -> torch.Tensor:
        """`(batch, channels, H, W)` -> `(batch, rows * columns, patch_size**2 * channels)`, patches in row-major
        order, each flattened as (row in patch, column in patch, channel). H and W are the config's image size, or
        with `interpolate_pos_encoding` any multiples of the patch size."""
        return self._patches(pixel_values, self.patch_grid(pixel_values, interpolate_pos_encoding))

    def _patches(self, pixel_values: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """`patchify` of pixels already checked by `patch_grid` (once per forward)."""
        rows, columns = grid
        p, c = self.config.patch_size, self.config.num_channels
        x = pixel_values.reshape(pixel_values.shape[0], c, rows, p, columns, p).permute(0, 2, 4, 3, 5, 1)
        return x.reshape(pixel_values.shape[0], rows * columns, p * p * c)

    def unpatchify(self, patches: torch.Tensor, original_image_size: tuple[int, int] | None = None) -> torch.Tensor:
        """Inverse of `patchify`, for images of `original_image_size` = (height, width) (default: the config's)."""
        p, c = self.config.patch_size, self.config.num_channels
        height, width = original_image_size or (self.config.image_size, self.config.image_size)
        rows, columns = height // p, width // p
        expected = (rows * columns, p * p * c)
        if height % p or width % p or patches.dim() != 3 or tuple(patches.shape[1:]) != expected:
            raise ValueError(f"unpatchify of {height}x{width} images expects (batch, {expected[0]}, {expected[1]}), "
                             f"got {tuple(patches.shape)}.")
        x = patches.reshape(patches.shape[0], rows, columns, p, p, c).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(patches.shape[0], c, height, width)

    def image_processor(self) -> ViTImageProcessorPil:
        """The processor that turns PIL images (any mode) into this model's `pixel_values`."""
        return ViTImageProcessorPil(
            size={"height": self.config.image_size, "width": self.config.image_size},
            resample=PILImageResampling.BICUBIC,
            image_mean=list(self.config.image_mean),
            image_std=list(self.config.image_std),
            do_convert_rgb=self.config.num_channels == 3,
        )

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Save weights, config and code files, plus the image processor, so that `AutoImageProcessor` and
        pipelines load the folder too."""
        if kwargs.get("is_main_process", True):
            self.image_processor().save_pretrained(save_directory)
        saved = super().save_pretrained(save_directory, *args, **kwargs)
        for name in os.listdir(save_directory):
            if name.endswith(".safetensors"):
                follow_umask(os.path.join(save_directory, name))
        return saved


class MAEDecoder(MAEPreTrainedModel, SinCosPositions):
    """Lightweight decoder: visible tokens + mask tokens, back in image order, to pixels of every patch.

    A `PreTrainedModel` inside `MAEForPreTraining` (as transformers' encoder-decoder models nest theirs) so that its own
    `_can_record_outputs` records its hidden states and attentions (`output_hidden_states` / `output_attentions`),
    returned under their decoder names in the pretraining output."""

    # Negative `output_hidden_states` indices count from the decoder's own depth.
    _can_record_outputs = {
        "hidden_states": OutputRecorder(MAELayer, num_hidden_layers_key="decoder_num_hidden_layers"),
        "attentions": OutputRecorder(MAEAttention, index=1),
    }

    def __init__(self, config: MAEConfig):
        super().__init__(config)
        width = config.decoder_hidden_size
        self.init_positions((config.grid_size, config.grid_size), width)
        self.embed = nn.Linear(config.hidden_size, width)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        self.layers = nn.ModuleList(
            MAELayer(width, config.decoder_num_attention_heads, config.decoder_intermediate_size, config)
            for _ in range(config.decoder_num_hidden_layers)
        )
        self.norm = nn.LayerNorm(width, eps=config.layer_norm_eps)
        self.pred = nn.Linear(width, config.patch_size**2 * config.num_channels)
        self.post_init()

    @capture_outputs(tie_last_hidden_states=False)
    def forward(self, latent: torch.Tensor, ids_restore: torch.Tensor, grid: tuple[int, int],
                **kwargs: Unpack[TransformersKwargs]) -> MAEDecoderOutput:
        kwargs["output_attentions"] = kwargs.get("output_attentions", self.config.output_attentions)
        x = self.embed(latent)
        batch, num_kept, width = x.shape[0], x.shape[1] - 1, x.shape[-1]
        # The kept tokens and one mask token, then back in image order: every hidden patch gathers that mask token
        # (its gradient is then one scatter-add, not a sum over a strided view of hundreds of copies: 2x faster).
        patches = torch.cat([x[:, 1:], self.mask_token.expand(batch, 1, -1)], dim=1)
        patches = torch.gather(patches, 1, ids_restore.clamp(max=num_kept)[:, :, None].expand(-1, -1, width))
        x = torch.cat([x[:, :1], patches], dim=1) + self.positions(grid)
        for layer in self.layers:
            x = layer(x, **kwargs)
        return MAEDecoderOutput(logits=self.pred(self.norm(x))[:, 1:])


class MAEModel(MAEPreTrainedModel):
    """The MAE encoder. Without `mask_ratio` it sees every patch: features are deterministic."""

    # The encoder loads from any of the three checkpoints; the other models' parts are expected to be left over.
    _keys_to_ignore_on_load_unexpected = [r"^decoder\.", r"^head_norm\.", r"^classifier\."]

    def __init__(self, config: MAEConfig):
        super().__init__(config)
        self.embeddings = MAEEmbeddings(config)
        # Linear from 0 to drop_path_rate; plain floats (a tensor here could not be read on the meta device).
        last = max(config.num_hidden_layers - 1, 1)
        self.layers = nn.ModuleList(
            MAELayer(config.hidden_size, config.num_attention_heads, config.intermediate_size, config,
                     config.drop_path_rate * i / last)
            for i in range(config.num_hidden_layers)
        )
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.embeddings.patch_projection

    @capture_outputs(tie_last_hidden_states=False)
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        mask_ratio: float | None = None,
        interpolate_pos_encoding: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> MAEModelOutput:
        r"""
        pixel_values: `(batch, num_channels, image_size, image_size)` floats, as the image processor makes them.
        noise: `(batch, num_patches)`: the patches with the lowest noise are kept, so a given noise makes the
            masking deterministic. Given alone, it masks `config.mask_ratio` of the patches (as ViTMAEModel does).
        mask_ratio: fraction of patches to hide; default 0 (every patch seen, deterministic features), or
            `config.mask_ratio` when `noise` is given.
        interpolate_pos_encoding: accept images of any height and width divisible by the patch size, with the
            sin-cos positions of their patch grid.
        output_hidden_states, output_attentions, return_dict: as in every transformers model.
        """
        if mask_ratio is None:  # checked by `random_masking`, against the patches of these images
            mask_ratio = self.config.mask_ratio if noise is not None else 0.0
        kwargs["output_attentions"] = kwargs.get("output_attentions", self.config.output_attentions)
        grid = self.patch_grid(pixel_values, interpolate_pos_encoding)
        x, mask, ids_restore = self.embeddings(self._patches(pixel_values, grid), grid, mask_ratio, noise)
        for layer in self.layers:
            x = layer(x, **kwargs)
        x = self.norm(x)
        pooled = x[:, 0] if self.config.pooling == "cls" else x[:, 1:].mean(dim=1)
        return MAEModelOutput(last_hidden_state=x, pooler_output=pooled, mask=mask, ids_restore=ids_restore)


class MAEForPreTraining(MAEPreTrainedModel):
    """Encoder + decoder, trained to reconstruct the pixels of the masked patches."""

    # A published folder may also hold a probe head next to encoder and decoder.
    _keys_to_ignore_on_load_unexpected = [r"^head_norm\.", r"^classifier\."]

    def __init__(self, config: MAEConfig):
        self.check_mask_ratio(config.mask_ratio)
        super().__init__(config)
        self.mae = MAEModel(config)
        self.decoder = MAEDecoder(config)
        self.post_init()

    @staticmethod
    def check_mask_ratio(mask_ratio: float) -> None:
        problem = mask_ratio_problem(mask_ratio, use="pretraining")
        if problem:
            raise ValueError(f"MAEForPreTraining: invalid mask_ratio={mask_ratio}: {problem}.")

    def forward_loss(self, pixel_values: torch.Tensor, logits: torch.Tensor, mask: torch.Tensor,
                     interpolate_pos_encoding: bool | None = False) -> torch.Tensor:
        """Mean squared error per patch, averaged over the masked patches only."""
        return self._masked_loss(self.patchify(pixel_values, interpolate_pos_encoding), logits, mask)

    def _masked_loss(self, target: torch.Tensor, logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.config.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        per_patch = ((logits.float() - target.float()) ** 2).mean(dim=-1)
        return (per_patch * mask).sum() / mask.sum()

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        interpolate_pos_encoding: bool | None = None,
        mask_ratio: float | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> MAEForPreTrainingOutput:
        r"""
        pixel_values: `(batch, num_channels, image_size, image_size)` floats.
        noise: `(batch, num_patches)`, optional; fixes which patches are masked (lowest noise kept).
        mask_ratio: fraction of patches to hide for this call, in (0, 1) (default: `config.mask_ratio`).
        interpolate_pos_encoding: accept images of any height and width divisible by the patch size.
        output_hidden_states, output_attentions: also for the decoder (`decoder_hidden_states`, `decoder_attentions`).
        """
        mask_ratio = self.config.mask_ratio if mask_ratio is None else mask_ratio
        self.check_mask_ratio(mask_ratio)
        encoded = self.mae(pixel_values, noise=noise, mask_ratio=mask_ratio,
                           interpolate_pos_encoding=interpolate_pos_encoding, return_dict=True, **kwargs)
        grid = tuple(side // self.config.patch_size for side in pixel_values.shape[2:])  # checked by the encoder
        decoded = self.decoder(encoded.last_hidden_state, encoded.ids_restore, grid, return_dict=True, **kwargs)
        loss = self._masked_loss(self._patches(pixel_values, grid), decoded.logits, encoded.mask)
        return MAEForPreTrainingOutput(
            loss=loss, logits=decoded.logits, mask=encoded.mask, ids_restore=encoded.ids_restore,
            hidden_states=encoded.hidden_states, attentions=encoded.attentions,
            decoder_hidden_states=decoded.hidden_states, decoder_attentions=decoded.attentions,
        )


class MAEForImageClassification(MAEPreTrainedModel):
    """Encoder + linear head. With `config.linear_probe` the encoder is frozen (eval mode, no gradients) and a
    BatchNorm without affine parameters normalises the features before the head, as in the MAE paper."""

    _keys_to_ignore_on_load_unexpected = [r"^decoder\."]  # starting from a pretraining checkpoint

    def __init__(self, config: MAEConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.mae = MAEModel(config)
        self.head_norm = (nn.BatchNorm1d(config.hidden_size, affine=False, eps=1e-6) if config.linear_probe
                          else nn.Identity())
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()
        self.freeze_encoder_if_probing()

    def freeze_encoder_if_probing(self) -> None:
        if self.config.linear_probe:
            self.mae.requires_grad_(False)
            self.mae.eval()

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        # Loading re-creates parameters with requires_grad=True; the probe's encoder must stay frozen.
        loaded = super().from_pretrained(*args, **kwargs)
        (loaded[0] if isinstance(loaded, tuple) else loaded).freeze_encoder_if_probing()
        return loaded

    def train(self, mode: bool = True):
        super().train(mode)
        if self.config.linear_probe:
            self.mae.eval()
        return self

    def check_labels(self, labels: torch.Tensor, batch: int) -> None:
        """Labels must fit the problem type (`config.problem_type`, or inferred as transformers does)."""
        if not isinstance(labels, torch.Tensor):
            raise ValueError(f"labels must be a torch.Tensor, got {type(labels).__name__}.")
        problem = self.config.problem_type or (
            "regression" if self.num_labels == 1
            else "multi_label_classification" if labels.is_floating_point() else "single_label_classification")
        if problem == "single_label_classification":
            # Any integer type (cross-entropy wants int64: converted in forward). The range is not checked here:
            # that would read the labels on the host, a device sync in every training step.
            expected = f"(batch,) = ({batch},), integer class indices in [0, {self.num_labels})"
            fits = labels.dim() == 1 and not labels.is_floating_point() and not labels.is_complex() and \
                labels.dtype != torch.bool
        elif problem == "multi_label_classification":
            expected = f"(batch, num_labels) = ({batch}, {self.num_labels}), floats"
            fits = labels.dim() == 2 and labels.is_floating_point()
        else:  # (batch,) against (batch, num_labels > 1) logits would broadcast into a wrong loss
            expected = f"(batch,) = ({batch},) floats" if self.num_labels == 1 else \
                f"(batch, num_labels) = ({batch}, {self.num_labels}) floats"
            fits = labels.is_floating_point() and (labels.dim() == 2 or self.num_labels == 1) and labels.dim() in (1, 2)
        if not fits or labels.shape[0] != batch or (labels.dim() == 2 and labels.shape[1] != self.num_labels):
            raise ValueError(f"labels for {problem} must have shape {expected}; got {tuple(labels.shape)} "
                             f"{labels.dtype}.")

    def classify_features(self, pooled: torch.Tensor) -> torch.Tensor:
        """Logits from pooled encoder features: lets a probe train the head on cached features."""
        if self.config.linear_probe and self.training and pooled.shape[0] == 1:
            raise ValueError("linear_probe=True normalises features over the batch (BatchNorm) while training: a "
                             "training batch needs at least 2 images, got 1. Drop the last incomplete batch "
                             "(dataloader_drop_last=True) or choose a batch size that does not leave one image.")
        return self.classifier(self.head_norm(pooled))

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        interpolate_pos_encoding: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> ImageClassifierOutput:
        r"""
        labels: `(batch,)` class indices in `[0, num_labels)`, giving a cross-entropy `loss`; or, as in transformers'
            classifiers (`config.problem_type`), `(batch, num_labels)` floats for multi-label (binary cross-entropy)
            and `(batch,)` floats with `num_labels=1` for regression (mean squared error).
        interpolate_pos_encoding: accept images of any height and width divisible by the patch size.
        """
        if self.config.linear_probe and self.mae.embeddings.cls_token.requires_grad:
            logger.warning_once("linear_probe=True runs the encoder without gradients: parameters set back to "
                                "requires_grad=True are not trained. Build the model with linear_probe=False to "
                                "fine-tune the encoder.")
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.config.linear_probe):
            encoded = self.mae(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding, return_dict=True,
                               **kwargs)
        logits = self.classify_features(encoded.pooler_output)
        loss = None
        if labels is not None:
            self.check_labels(labels, logits.shape[0])  # before loss_function, which settles config.problem_type
            if not labels.is_floating_point():
                labels = labels.long()  # cross-entropy's index type (a no-op for int64)
            loss = self.loss_function(labels, logits.float(), self.config)
        return ImageClassifierOutput(loss=loss, logits=logits, hidden_states=encoded.hidden_states,
                                     attentions=encoded.attentions)


__all__ = ["MAEForImageClassification", "MAEForPreTraining", "MAEModel", "MAEPreTrainedModel"]

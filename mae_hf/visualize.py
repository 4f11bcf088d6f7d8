"""Pictures of a run: reconstructions of masked images, and the loss curve. Imports nothing from mae_hf: the demo
app loads it by path, and a Space runs it without the package installed.
"""

import contextlib

import numpy as np
import torch
from PIL import Image, ImageDraw

ROW_TITLES = ("original", "masked input", "reconstruction", "reconstruction + visible")


@torch.no_grad()
def reconstruct(model, pixel_values: torch.Tensor, noise: torch.Tensor, mask_ratio: float | None = None,
                bf16: bool = False):
    """`(pictures, loss)`: pictures `(4, B, C, H, W)` in [0, 1] (the `ROW_TITLES`) and the batch's masked-patch loss,
    masking `mask_ratio` of the patches (default: the model's), under bf16 autocast when `bf16`. A `norm_pix_loss`
    model's predictions get each patch's mean/std back from the original."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    pixel_values, noise = pixel_values.to(device).float(), noise.to(device)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if bf16 and device.type in ("cpu", "cuda")
                else contextlib.nullcontext())
    try:  # the ratio goes with the call, not into the shared config: safe for a model serving several requests
        with autocast:
            outputs = model(pixel_values, noise=noise, **({} if mask_ratio is None else {"mask_ratio": mask_ratio}))
    finally:
        model.train(was_training)

    target = model.patchify(pixel_values)
    prediction = outputs.logits.float()
    if model.config.norm_pix_loss:
        mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
        prediction = prediction * (var + 1.0e-6) ** 0.5 + mean
    mask = outputs.mask[..., None]
    images = torch.stack([target, target * (1 - mask), prediction, target * (1 - mask) + prediction * mask])
    mean = torch.tensor(model.config.image_mean, device=device).view(1, 1, -1, 1, 1)
    std = torch.tensor(model.config.image_std, device=device).view(1, 1, -1, 1, 1)
    pictures = torch.stack([model.unpatchify(rows) for rows in images]) * std + mean
    hidden = model.unpatchify(mask.expand_as(target)).bool()
    pictures[1] = pictures[1].masked_fill(hidden, 0.5)  # grey where patches were masked
    return pictures.clamp(0, 1).cpu(), outputs.loss


def reconstruction_rows(model, pixel_values: torch.Tensor, noise: torch.Tensor, bf16: bool = False) -> torch.Tensor:
    """The pictures of `reconstruct` at the model's own mask ratio."""
    return reconstruct(model, pixel_values, noise, bf16=bf16)[0]


def to_pil(picture: torch.Tensor, scale: int = 1) -> Image.Image:
    """A `(C, H, W)` image in [0, 1] as an RGB PIL image, upscaled (nearest: patches stay sharp) by `scale`."""
    channels, height, width = picture.shape
    array = (picture.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    image = Image.fromarray(array.squeeze(-1) if channels == 1 else array).convert("RGB")
    return image.resize((width * scale, height * scale), Image.Resampling.NEAREST) if scale != 1 else image


def grid_image(rows: torch.Tensor, titles=ROW_TITLES, scale: int = 4, gap: int = 2) -> Image.Image:
    """Lay out `(R, B, C, H, W)` images in [0, 1] as a grid with a title column, upscaled (nearest) by `scale`."""
    num_rows, num_cols, channels, height, width = rows.shape
    cell_h, cell_w = height * scale, width * scale
    title_width = 150
    canvas = Image.new("RGB", (title_width + num_cols * (cell_w + gap), num_rows * (cell_h + gap)), "white")
    draw = ImageDraw.Draw(canvas)
    for r in range(num_rows):
        draw.text((4, r * (cell_h + gap) + cell_h // 2 - 6), titles[r], fill="black")
        for c in range(num_cols):
            canvas.paste(to_pil(rows[r, c], scale), (title_width + c * (cell_w + gap), r * (cell_h + gap)))
    return canvas


def save_loss_curve(log_history: list[dict], path: str) -> bool:
    """Train and eval loss against step from `Trainer.state.log_history`; False when there is nothing to plot."""
    train = [(entry["step"], entry["loss"]) for entry in log_history if "loss" in entry]
    evaluation = [(entry["step"], entry["eval_loss"]) for entry in log_history if "eval_loss" in entry]
    if not train and not evaluation:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    for points, label, style in ((train, "train loss", "-"), (evaluation, "eval loss", "o-")):
        if points:
            axis.plot(*zip(*points), style, label=label)
    axis.set_xlabel("step")
    axis.set_ylabel("reconstruction loss (masked patches)")
    axis.legend()
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return True

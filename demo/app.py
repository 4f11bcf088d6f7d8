"""MAE in the browser: hide part of an image and see what the model paints back (and its top-5 classes).

    python demo/app.py --model runs/hub                 # a published, pretraining, probe or fine-tune folder
    MAE_MODEL=user/mae-cifar10 python demo/app.py       # or a Hub id (flag or environment variable)
    python app.py                                       # inside a folder made by `publish.py --space true`

Upload an image (or pick an example) and choose how much of it to hide; with a trained classifier head, the page
shows the head's top-5 classes too.

The bundled examples are CIFAR-10 training images (the public CIFAR-10 release, via the project's local copy).

The model loads through the Auto classes with `trust_remote_code=True`, from the folder's own code files, so the
app needs torch, transformers and gradio but not mae_hf. The drawing code is mae_hf/visualize.py and the precision
rule (bf16 where the CPU computes it natively) mae_hf/precision.py, both loaded by path: from this folder (a Space)
or from the repository.
"""

import argparse
import importlib.util
import json
import os
import statistics
import time
import uuid

import gradio as gr
import torch
from PIL import Image, UnidentifiedImageError
from transformers import AutoImageProcessor, AutoModelForImageClassification, AutoModelForPreTraining

HERE = os.path.dirname(os.path.abspath(__file__))
MODEL_ENV = "MAE_MODEL"
DISPLAY_PIXELS = 256  # pictures are shown upscaled (nearest) to about this size; patches stay visible
TITLES = ("original (model size)", "masked input", "reconstruction", "reconstruction + visible")


def load_package_file(name: str):
    """mae_hf/<name>.py, by path: importing the package instead would register its classes and shadow the folder's
    own code (and a Space does not have it)."""
    for path in (os.path.join(HERE, f"{name}.py"), os.path.join(HERE, os.pardir, "mae_hf", f"{name}.py")):
        if os.path.isfile(path):
            spec = importlib.util.spec_from_file_location(f"mae_demo_{name}", path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            return module
    raise ImportError(f"{name}.py is neither next to {__file__} nor in the repository's mae_hf/.")


drawing = load_package_file("visualize")
precision = load_package_file("precision")


def default_model() -> str | None:
    """$MAE_MODEL, else this folder when it holds a model (the app of a published folder or Space)."""
    if os.environ.get(MODEL_ENV):
        return os.environ[MODEL_ENV]
    return HERE if os.path.isfile(os.path.join(HERE, "config.json")) else None


def local_folder(source: str) -> str:
    """A local folder as it is; anything else is taken as a Hub id and downloaded (cached by huggingface_hub)."""
    if os.path.isdir(source):
        return source
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(source)
    except Exception as error:
        raise ValueError(f"{source} is not a local folder, and downloading it from the Hub failed "
                         f"({type(error).__name__}: {' '.join(str(error).split())}).") from None


def weight_names(folder: str) -> set[str]:
    """The parameter names stored in a folder's safetensors weights (single or sharded), without loading them."""
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as handle:
            return set(json.load(handle)["weight_map"])
    from safetensors import safe_open

    path = os.path.join(folder, "model.safetensors")
    try:
        with safe_open(path, framework="pt") as weights:
            return set(weights.keys())
    except Exception as error:  # safetensors' own error type: a truncated or garbage file
        raise ValueError(f"{path} is not a whole safetensors file ({' '.join(str(error).split())}); save or copy the "
                         "model again.") from None


def read_mae_config(folder: str, source: str) -> dict:
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path) or not any(os.path.isfile(os.path.join(folder, name)) for name in
                                           ("model.safetensors", "model.safetensors.index.json")):
        raise ValueError(f"{source} is not an MAE model folder: it needs config.json and model.safetensors "
                         "(the output of pretrain.py, linear_probe.py, finetune.py or publish.py).")
    with open(path) as handle:
        config = json.load(handle)
    if config.get("model_type") != "mae_hf":
        raise ValueError(f"{source} is not an MAE model of this project: its config.json says model_type "
                         f"{config.get('model_type')!r}, expected 'mae_hf' (convert a ViTMAE folder with "
                         "scripts/convert.py).")
    return config


class Demo:
    """The models of one folder: encoder + decoder when it has a decoder, and each trained classifier head (the
    folder's own, a probe or a fine-tune, and a published folder's `finetuned/`), on the CPU, in bf16 by default
    where the CPU computes it natively (`bf16`: None for that default, True or False to choose). In bf16 the weights
    are converted once: autocast would cast every weight again for each image, which costs a one-image forward about
    what bf16 saves."""

    def __init__(self, source: str, bf16: bool | None = None):
        self.source = source
        self.bf16, self.precision = precision.decide_bf16(bf16, "cpu", switch=True)
        self.precision = self.precision.replace("bf16 autocast", "bf16 weights")
        folder = local_folder(source)
        config = read_mae_config(folder, source)
        names = weight_names(folder)
        load = dict(trust_remote_code=True)
        self.mae = self.processor = None
        if any(name.startswith("decoder.") for name in names):
            self.mae = AutoModelForPreTraining.from_pretrained(folder, **load).eval()
            self.processor = AutoImageProcessor.from_pretrained(folder)
        self.classifiers = {}  # title -> (model, processor)
        candidates = [(folder, "linear probe" if config.get("linear_probe") else "classifier")]
        if os.path.isfile(os.path.join(folder, "finetuned", "config.json")):
            candidates.append((os.path.join(folder, "finetuned"), "fine-tuned (finetuned/)"))
        for path, title in candidates:
            if "classifier.weight" in weight_names(path):
                read_mae_config(path, f"{source}/{os.path.relpath(path, folder)}")
                self.classifiers[title] = (AutoModelForImageClassification.from_pretrained(path, **load).eval(),
                                           AutoImageProcessor.from_pretrained(path))
        if self.mae is None and not self.classifiers:
            raise ValueError(f"{source} has neither a decoder nor a classifier head: nothing to show.")
        if self.bf16:
            for model in [self.mae] + [model for model, _ in self.classifiers.values()]:
                if model is not None:
                    model.to(torch.bfloat16)

    def describe(self) -> str:
        parts = []
        if self.mae is not None:
            config = self.mae.config
            parts.append(f"MAE {config.image_size} px, patch {config.patch_size}, trained mask ratio "
                         f"{config.mask_ratio}" + (", per-patch normalised targets" if config.norm_pix_loss else ""))
        else:
            parts.append("no decoder in this folder (a classifier checkpoint): no reconstructions")
        parts += [f"{title} head over {model.config.num_labels} classes"
                  for title, (model, _) in self.classifiers.items()]
        return f"**Model** `{self.source}`: " + "; ".join(parts) + f"; {self.precision}."

    @torch.no_grad()
    def run(self, image: Image.Image, mask_ratio: float, seed: int):
        """(four pictures or Nones, loss text, {title: {label: probability}} of the top 5 per head)."""
        pictures, loss_text = [None] * 4, "no decoder: no reconstruction"
        if self.mae is not None:
            pixel_values = self.processor(images=image, return_tensors="pt").pixel_values
            noise = torch.rand(1, self.mae.config.num_patches, generator=torch.Generator().manual_seed(int(seed)))
            rows, loss = drawing.reconstruct(self.mae, pixel_values, noise, mask_ratio=mask_ratio)
            scale = max(1, DISPLAY_PIXELS // self.mae.config.image_size)
            pictures = [drawing.to_pil(row[0], scale) for row in rows]
            loss_text = (f"**Masked-patch loss** {loss.item():.4f} (mean squared error over the hidden patches"
                         + (", per-patch normalised pixels)" if self.mae.config.norm_pix_loss else ")"))
        top5 = {}
        for title, (model, processor) in self.classifiers.items():
            logits = model(processor(images=image, return_tensors="pt").pixel_values).logits
            probabilities = logits.float().softmax(-1)[0]
            values, indices = probabilities.topk(min(5, len(probabilities)))
            top5[title] = {model.config.id2label[i]: v for v, i in zip(values.tolist(), indices.tolist())}
        return pictures, loss_text, top5


def open_image(path: str | None) -> Image.Image:
    if not path:
        raise ValueError("upload an image or pick an example.")
    try:
        with Image.open(path) as image:
            image.load()
            return image.copy()
    except (UnidentifiedImageError, OSError) as error:
        raise ValueError(f"cannot read {os.path.basename(path)} as an image ({error}); upload a PNG, JPEG, "
                         "WebP, GIF or BMP file.") from None


def build(source: str | None, bf16: bool | None = None) -> gr.Blocks:
    """The page. A model that fails to load still gives a page, which says why."""
    demo, load_error = None, None
    try:
        if source is None:
            raise ValueError(f"no model given: pass --model FOLDER_OR_HUB_ID or set {MODEL_ENV}.")
        demo = Demo(source, bf16)
    except (ValueError, OSError) as error:
        load_error = f"**Error:** {' '.join(str(error).split())}"
    heads = list(demo.classifiers) if demo else []
    examples_dir = os.path.join(HERE, "examples")
    examples = sorted(os.path.join(examples_dir, name) for name in
                      (os.listdir(examples_dir) if os.path.isdir(examples_dir) else [])
                      if name.lower().endswith((".png", ".jpg", ".jpeg", ".webp")))

    def predict(path, mask_ratio, seed):
        empty = [None] * 4 + [""] + [None] * len(heads)
        if demo is None:
            return empty + [load_error]
        try:
            started = time.perf_counter()
            pictures, loss_text, top5 = demo.run(open_image(path), mask_ratio, seed)
            # Gradio stores an output image under its content's hash and rewrites that file whenever a call returns the
            # same picture again, while the browser may still be reading it (a broken picture: "Response content
            # shorter than Content-Length"); a PNG text chunk per call keeps each call's files apart.
            call = uuid.uuid4().hex
            for picture in filter(None, pictures):
                picture.info["call"] = call
            status = f"Done in {1000 * (time.perf_counter() - started):.0f} ms."
            return pictures + [loss_text] + [top5[title] for title in heads] + [status]
        except ValueError as error:
            return empty + [f"**Error:** {' '.join(str(error).split())}"]

    with gr.Blocks(title="MAE reconstruction demo") as page:
        gr.Markdown("# Masked autoencoder: what does it paint back?\n"
                    + (load_error or demo.describe()), elem_id="model-info")
        with gr.Row():
            with gr.Column(scale=1):
                upload = gr.File(label="Image (any size or mode)", file_types=["image"], type="filepath",
                                 elem_id="upload")
                ratio = gr.Slider(0.05, 0.95, value=demo.mae.config.mask_ratio if demo and demo.mae else 0.75,
                                  step=0.05, label="Mask ratio", elem_id="mask-ratio")
                seed = gr.Number(value=0, precision=0, label="Seed (which patches are hidden)", elem_id="seed")
                button = gr.Button("Run", variant="primary", elem_id="run")
                if examples:
                    gr.Examples(examples, inputs=upload, label="Examples (CIFAR-10)")
            with gr.Column(scale=3):
                with gr.Row():
                    images = [gr.Image(label=title, type="pil", format="png", interactive=False,
                                       elem_id=f"picture-{index}") for index, title in enumerate(TITLES)]
                loss = gr.Markdown(elem_id="loss")
                labels = [gr.Label(num_top_classes=5, label=f"Top-5 classes: {title}", elem_id=f"top5-{index}")
                          for index, title in enumerate(heads)]
                status = gr.Markdown(load_error or "", elem_id="status")
        outputs = images + [loss] + labels + [status]
        inputs = [upload, ratio, seed]
        # One run at a time, stated rather than left to Gradio's defaults (GRADIO_DEFAULT_CONCURRENCY_LIMIT can raise
        # them): on a CPU Space, runs at once only compete for the same cores (the mask ratio goes with each call).
        # One API endpoint, named: the other controls call the same function, so they stay out of the API.
        for trigger in (button.click, upload.change, ratio.change, seed.submit):
            named = trigger == button.click
            trigger(predict, inputs, outputs, trigger_mode="always_last",  # while dragging: the latest value
                    concurrency_limit=1, concurrency_id="model", api_name="reconstruct" if named else None,
                    api_visibility="public" if named else "private")
    return page


def seconds_per_image(source: str, count: int, bf16: bool | None = None) -> tuple[float, float, str]:
    """Medians over `count` random 32 px images of `Demo.run` (reconstruction + every head): wall seconds, and CPU
    seconds of this process (all threads; on a busy machine the wall time also counts waiting for a core); and the
    precision it ran in."""
    demo, wall, cpu = Demo(source, bf16), [], []
    generator = torch.Generator().manual_seed(0)
    for index in range(count + 1):  # the first call warms up
        pixels = torch.randint(0, 256, (32, 32, 3), dtype=torch.uint8, generator=generator).numpy()
        started, started_cpu = time.perf_counter(), time.process_time()
        demo.run(Image.fromarray(pixels), 0.75, index)
        wall.append(time.perf_counter() - started)
        cpu.append(time.process_time() - started_cpu)
    return statistics.median(wall[1:]), statistics.median(cpu[1:]), demo.precision


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=default_model(),
                        help=f"Model folder or Hub id (default: ${MODEL_ENV}, else this folder if it holds one).")
    parser.add_argument("--host", help="Address to serve on (default: Gradio's, 127.0.0.1 or $GRADIO_SERVER_NAME).")
    parser.add_argument("--port", type=int, help="Port (default: Gradio's, 7860 or $GRADIO_SERVER_PORT).")
    parser.add_argument("--share", action=argparse.BooleanOptionalAction, default=False,
                        help="Also serve on a temporary public gradio.live link (needs network access).")
    parser.add_argument("--threads", type=int, default=1,
                        help="Torch threads (default 1: one small image is too little work to share out, and on a "
                             "busy or shared CPU more threads wait on each other; measured in mae_hf's "
                             "docs/publishing.md).")
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                        help="bf16 weights (--bf16 / --no-bf16); default: on where the CPU computes bf16 natively "
                             "(AMX or AVX512-BF16): 1.5x faster per image there (docs/cpu_speed.md).")
    parser.add_argument("--measure", type=int, metavar="N",
                        help="Print the median seconds per image over N images instead of serving.")
    args = parser.parse_args(argv)
    for flag, value in (("--threads", args.threads), ("--measure", args.measure)):
        if value is not None and value < 1:
            parser.error(f"{flag} must be a positive number, got {value}.")
    torch.set_num_threads(args.threads)
    if args.measure:
        try:
            wall, cpu, precision_used = seconds_per_image(args.model, args.measure, args.bf16)
        except ValueError as error:
            parser.exit(1, f"error: {error}\n")
        print(f"[demo] per image (median of {args.measure}): {wall:.3f} s wall, {cpu:.3f} s CPU time "
              f"({torch.get_num_threads()} threads, {precision_used}, load average {os.getloadavg()[0]:.1f})")
        return
    page = build(args.model, args.bf16)
    # quiet: Gradio's own lines would tell to set `share=True` in `launch()`, which a user of this app cannot do
    page.launch(server_name=args.host, server_port=args.port, share=args.share, quiet=True, prevent_thread_lock=True)
    print(f"[demo] serving on {page.local_url}" + (f" and {page.share_url}" if page.share_url else
                                                   " (--share: also on a public link)"), flush=True)
    page.block_thread()


if __name__ == "__main__":
    main()

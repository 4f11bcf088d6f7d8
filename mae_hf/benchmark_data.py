"""Benchmarks of the data path (scripts/benchmark.py --suite data / listing / memory, described in
mae_hf/benchmark.py), on synthetic JPEGs that this module writes itself (photo-like: smooth colour fields with grain,
short side 256, four aspect ratios)."""

import io
import json
import math
import os
import random
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

ASPECTS = ((256, 341), (341, 256), (256, 256), (256, 384))  # (height, width) at short side 256
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
LOADERS = ("mae_hf", "run_mae.py")  # make_loader's two: the prepared folder's, run_mae.py's per-image transform


def jpeg_bytes(index: int, quality: int = 90) -> bytes:
    """A smooth random colour field with grain: JPEG sizes and decode times of photographs, not of noise."""
    from PIL import Image

    rng = np.random.default_rng(index)
    height, width = ASPECTS[index % len(ASPECTS)]
    coarse = rng.integers(0, 256, (height // 24 + 2, width // 24 + 2, 3), dtype=np.uint8)
    field = np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC), dtype=np.float32)
    photo = np.clip(field + rng.normal(0, 6, field.shape), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(photo).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def write_image_folder(folder: str, count: int, classes: int = 10) -> str:
    """An image-folder tree of `count` JPEGs (folder/class_k/i.jpg); written in parallel, kept if already there."""
    done = os.path.join(folder, ".complete")
    if os.path.isfile(done):
        return folder
    for label in range(classes):
        os.makedirs(os.path.join(folder, f"class_{label}"), exist_ok=True)
    with torch.multiprocessing.get_context("fork").Pool() as pool:
        for index, data in enumerate(pool.imap(jpeg_bytes, range(count), chunksize=64)):
            with open(os.path.join(folder, f"class_{index % classes}", f"{index:07d}.jpg"), "wb") as handle:
                handle.write(data)
    open(done, "w").close()
    return folder


def prepared_folder(root: str, count: int) -> str:
    """A prepared folder (short side 256, JPEG) of `count` synthetic images, made once under `root`."""
    from .data.arguments import SourceArguments
    from .data.prepare import PrepareArguments, prepare
    from .data.prepared import is_prepared

    output = os.path.join(root, f"prepared_{count}")
    if not is_prepared(output):
        source = write_image_folder(os.path.join(root, f"jpegs_{count}"), count)
        prepare(SourceArguments(train_dir=source), PrepareArguments(output_dir=output, disable_tqdm=True),
                command="benchmark")
    return output


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (/proc/<pid>/stat)."""
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proportional_memory(pid: int) -> tuple[int, int]:
    """(bytes of proportional set size — shared pages divided among their users —, of which shared memory: the
    batches on their way from the workers)."""
    values = {}
    with open(f"/proc/{pid}/smaps_rollup") as handle:
        for line in handle:
            key = line.split(":")[0]
            if key in ("Pss", "Pss_Shmem"):
                values[key] = int(line.split()[1]) * 1024
    return values.get("Pss", 0), values.get("Pss_Shmem", 0)


def timed_epoch(loader) -> dict:
    """One pass over `loader` (persistent workers): images, wall seconds, the workers' CPU seconds, the peak PSS of
    this process and its workers together, with and without the batches in flight (shared memory: their number is
    workers x prefetch, whatever the data's size, but one more or less at a sample moves the total by a batch)."""
    iterator = iter(loader)
    workers = [worker.pid for worker in iterator._workers]
    started, images, peak, peak_own = time.perf_counter(), 0, 0, 0
    for batch in iterator:
        images += len(batch["pixel_values"])
        samples = [proportional_memory(pid) for pid in (os.getpid(), *workers)]
        peak = max(peak, sum(total for total, _ in samples))
        peak_own = max(peak_own, sum(total - shared for total, shared in samples))
    cpu = sum(map(process_cpu_seconds, workers))
    seconds = time.perf_counter() - started
    iterator._shutdown_workers()
    return {"images": images, "seconds": seconds, "worker_cpu_seconds": cpu,
            "images_per_worker_cpu_second": images / cpu, "peak_pss_mb": peak / 2**20,
            "peak_pss_without_batches_in_flight_mb": peak_own / 2**20}


def run_mae_transform(image_size: int):
    """transformers' run_mae.py training transform, on PIL (what torchvision's PIL path does): RandomResizedCrop
    (scale 0.2-1, bicubic), horizontal flip, to tensor, normalise — per image, in the DataLoader workers."""
    from PIL import Image, ImageOps

    def crop_box(width: int, height: int) -> tuple:
        area = width * height
        for _ in range(10):
            target = area * random.uniform(0.2, 1.0)
            aspect = math.exp(random.uniform(math.log(3 / 4), math.log(4 / 3)))
            w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
            if 0 < w <= width and 0 < h <= height:
                left, top = random.randint(0, width - w), random.randint(0, height - h)
                return left, top, left + w, top + h
        return 0, 0, width, height

    mean, std = torch.tensor(MEAN).view(3, 1, 1), torch.tensor(STD).view(3, 1, 1)

    def transform(batch):
        pixels = []
        for image in batch["image"]:
            image = image.convert("RGB")
            image = image.resize((image_size, image_size), Image.Resampling.BICUBIC, box=crop_box(*image.size))
            if random.random() < 0.5:
                image = ImageOps.mirror(image)
            tensor = torch.from_numpy(np.array(image)).permute(2, 0, 1).float().div_(255)
            pixels.append((tensor - mean) / std)
        return {"pixel_values": pixels}

    return transform


def make_loader(name: str, folder: str, image_size: int, batch_size: int, workers: int):
    """The prepared-folder loader ("mae_hf") or the per-image-transform loader ("run_mae.py") on the same stored
    JPEG bytes, shuffled, with persistent workers (alive after the epoch, so that their CPU time can be read)."""
    from .data import DataArguments, ImageDataset, collate, load_image_splits
    from .data.prepared import load_prepared

    if name == "mae_hf":
        stored = DataArguments(dataset_name=folder, data_in_memory="false", validation_split_percentage=1)
        train, _ = load_image_splits(stored, image_size, num_workers=workers)
        return torch.utils.data.DataLoader(ImageDataset(train), batch_size=batch_size, num_workers=workers,
                                           shuffle=True, collate_fn=collate, drop_last=True, persistent_workers=True)
    # run_mae.py's dataset: the memory-mapped split, each image decoded by PIL in the transform (what an `Image`
    # column does; casting the bytes to one would copy the whole column into memory first).
    from PIL import Image

    transform = run_mae_transform(image_size)
    stored = load_prepared(folder)["train"].select_columns(["image"]).with_transform(
        lambda batch: transform({"image": [Image.open(io.BytesIO(data)) for data in batch["image"]]}))
    return torch.utils.data.DataLoader(
        stored, batch_size=batch_size, shuffle=True, num_workers=workers, drop_last=True, persistent_workers=True,
        collate_fn=lambda examples: {"pixel_values": torch.stack([example["pixel_values"] for example in examples])})


def measure_in_a_fresh_process(folder: str, loader: str, image_size: int, batch_size: int, workers: int) -> dict:
    """`timed_epoch` of one loader in a process of its own: memory left behind by an earlier measurement (heap,
    caches) must not count against the next one."""
    code = ("import json, sys; from mae_hf.benchmark_data import make_loader, timed_epoch; "
            "print(json.dumps(timed_epoch(make_loader(sys.argv[1], sys.argv[2], *map(int, sys.argv[3:])))))")
    result = subprocess.run([sys.executable, "-c", code, loader, folder, str(image_size), str(batch_size),
                             str(workers)], capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"measuring {loader} on {folder} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.splitlines()[-1])


def data_suite(args) -> dict:
    """Per data size, a prepared folder's loader (decoded onto canvases, ready for the device) against run_mae.py's
    per-image transform in the workers on the same stored JPEG bytes: images per worker CPU-second and peak PSS."""
    root = args.data_dir or tempfile.mkdtemp(prefix="mae_hf_data_benchmark_")
    results = {}
    for count in args.data_sizes:
        folder = prepared_folder(root, count)
        results[count] = {name: measure_in_a_fresh_process(folder, name, args.data_image_size, args.batch_size,
                                                            args.data_workers) for name in LOADERS}
    print(f"\nDataLoader workers: {args.data_workers}, batch {args.batch_size}, JPEGs at short side 256, "
          f"model input {args.data_image_size} px\n")
    print("| images | images / worker CPU-s: mae_hf | run_mae.py's | ratio | peak PSS: mae_hf | run_mae.py's | "
          "without batches in flight: mae_hf | run_mae.py's |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for count, row in results.items():
        ours, theirs = (row[name]["images_per_worker_cpu_second"] for name in LOADERS)
        print(f"| {count:,} | {ours:,.0f} | {theirs:,.0f} | {ours / theirs:.2f} | " + " | ".join(
            f"{row[name][key]:,.0f} MB" for key in ("peak_pss_mb", "peak_pss_without_batches_in_flight_mb")
            for name in LOADERS) + " |")
    sizes = sorted(results)

    def growth_of(key: str) -> dict:
        return {name: results[sizes[-1]][name][key] - results[sizes[0]][name][key] for name in LOADERS}

    growth, own = growth_of("peak_pss_mb"), growth_of("peak_pss_without_batches_in_flight_mb")
    print(f"\npeak PSS growth from {sizes[0]:,} to {sizes[-1]:,} images: mae_hf {growth['mae_hf']:+,.0f} MB "
          f"({own['mae_hf']:+,.0f} MB without the batches in flight), run_mae.py {growth['run_mae.py']:+,.0f} MB "
          f"({own['run_mae.py']:+,.0f} MB)")
    return {"data_sizes": sizes, "workers": args.data_workers, "batch_size": args.batch_size,
            "image_size": args.data_image_size, "results": {str(k): v for k, v in results.items()},
            "peak_pss_growth_mb": growth, "peak_pss_without_batches_in_flight_growth_mb": own, "data_dir": root}


def listing_suite(args) -> dict:
    """One os.scandir pass over an image-folder tree of empty files (what --train_dir and prepare_data.py use)
    against `datasets`' imagefolder builder."""
    import datasets

    from .data.sources import list_image_folder

    root = args.data_dir or tempfile.mkdtemp(prefix="mae_hf_listing_")
    tree = os.path.join(root, f"listing_{args.listing_files}", "train")
    if not os.path.isdir(tree):
        for index in range(args.listing_files):
            folder = os.path.join(tree, f"n{index % 1000:05d}")
            if index < 1000:
                os.makedirs(folder)
            open(os.path.join(folder, f"image_{index:07d}.JPEG"), "wb").close()
    started = time.perf_counter()
    ours = list_image_folder(tree)
    ours_seconds = time.perf_counter() - started
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as cache:
        theirs = datasets.load_dataset("imagefolder", data_dir=os.path.dirname(tree), split="train", cache_dir=cache)
    theirs_seconds = time.perf_counter() - started
    print(f"\nlisting {args.listing_files:,} files in 1,000 class folders: os.scandir pass {ours_seconds:.1f} s "
          f"({ours.num_rows:,} images); datasets' imagefolder {theirs_seconds:.1f} s ({theirs.num_rows:,}); "
          f"ratio {theirs_seconds / ours_seconds:.0f}x")
    return {"files": args.listing_files, "scandir_seconds": ours_seconds, "datasets_imagefolder_seconds":
            theirs_seconds, "images": ours.num_rows}


MEMORY_PROBE = """
import json, sys
from mae_hf.data import DataArguments, load_image_splits
train, evaluation = load_image_splits(DataArguments(train_dir=sys.argv[1], data_in_memory="true"), int(sys.argv[2]))
images, _ = train.read(range(min(64, len(train))))
print(json.dumps({"decoded_bytes": train.decoded_bytes + evaluation.decoded_bytes,
                  "pixels": int(sum(3 * h * w for h, w in train.sizes.tolist() + evaluation.sizes.tolist()))}))
"""


def memory_suite(args) -> dict:
    """Peak memory (/usr/bin/time -v) of decoding N JPEGs into memory (`--data_in_memory true`), for each N of
    --memory_sizes: its growth against the decoded pixels."""
    root = args.data_dir or tempfile.mkdtemp(prefix="mae_hf_memory_")
    rows = []
    for count in args.memory_sizes:
        folder = write_image_folder(os.path.join(root, f"jpegs_{count}"), count)
        result = subprocess.run(["/usr/bin/time", "-v", sys.executable, "-c", MEMORY_PROBE, folder,
                                 str(args.data_image_size)], capture_output=True, text=True, check=True)
        peak = next(int(line.split()[-1]) * 1024 for line in result.stderr.splitlines()
                    if "Maximum resident set size" in line)
        rows.append({"images": count, "peak_rss_bytes": peak, **json.loads(result.stdout.splitlines()[-1])})
    from .data.transforms import stored_short_side

    print(f"\nDecoding N JPEGs (short side 256, four aspect ratios) into memory for a {args.data_image_size} px "
          f"model (aspect kept, stored at short side <= {stored_short_side(args.data_image_size)})\n")
    print("| images | pixels | held in memory | peak RSS |\n|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row['images']:,} | {row['pixels'] / 2**20:,.0f} MB | {row['decoded_bytes'] / 2**20:,.0f} MB | "
              f"{row['peak_rss_bytes'] / 2**20:,.0f} MB |")
    first, last = rows[0], rows[-1]
    slope = (last["peak_rss_bytes"] - first["peak_rss_bytes"]) / (last["pixels"] - first["pixels"])
    print(f"\npeak memory growth / decoded pixels growth from {first['images']:,} to {last['images']:,} images: "
          f"{slope:.2f}x")
    return {"rows": rows, "growth_per_decoded_byte": slope, "data_dir": root}

"""Fixtures for the script tests: a tiny image dataset on disk, the scripts as modules, one tiny pretraining run."""

import contextlib
import importlib.util
import io
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
# 8x8 images, 2x2 patches: a 4x4 grid of 16 patches of 12 values each.
TINY_MODEL = dict(image_size=8, patch_size=2, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                  decoder_hidden_size=16, decoder_num_hidden_layers=1, decoder_num_attention_heads=2)
MODES = ("RGB", "L", "RGBA", "P")  # every image mode the loaders must turn into RGB


def tiny_split(num_images: int, seed: int) -> datasets.Dataset:
    """12x12 images of mixed modes (image i has mode MODES[i % 4]) with labels cycling through 3 classes."""
    rng = np.random.default_rng(seed)
    images = [Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).convert(MODES[i % 4])
              for i in range(num_images)]
    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=["cat", "dog", "ship"])})
    return datasets.Dataset.from_dict({"img": images, "label": [i % 3 for i in range(num_images)]}, features=features)


@pytest.fixture(scope="session")
def parquet_folder(tmp_path_factory) -> Path:
    """A dataset folder like the Hub's CIFAR-10: train.parquet (48 images) and test.parquet (16 images)."""
    folder = tmp_path_factory.mktemp("tiny_dataset")
    tiny_split(48, seed=0).to_parquet(str(folder / "train.parquet"))
    tiny_split(16, seed=1).to_parquet(str(folder / "test.parquet"))
    return folder


@pytest.fixture(scope="session")
def tiny_overrides() -> str:
    return ",".join(f"{key}={value}" for key, value in TINY_MODEL.items())


class Scripts:
    """`scripts.pretrain`, `scripts.linear_probe`, ...: the command-line scripts imported as modules."""

    def __getattr__(self, name):
        if str(ROOT / "scripts") not in sys.path:
            sys.path.insert(0, str(ROOT / "scripts"))  # knn.py imports linear_probe.py, as when run directly
        spec = importlib.util.spec_from_file_location(f"script_{name}", ROOT / "scripts" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        setattr(self, name, module)
        return module


@pytest.fixture(scope="session")
def scripts() -> Scripts:
    return Scripts()


@pytest.fixture(scope="session")
def pretrained_run(tmp_path_factory, scripts, parquet_folder, tiny_overrides):
    """(folder, printed output) of one tiny pretraining run: 48 images, 2 epochs, kNN evaluation on."""
    folder = tmp_path_factory.mktemp("pretrained") / "run"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        scripts.pretrain.main(["--output_dir", str(folder), "--dataset_name", str(parquet_folder),
                               "--config_overrides", tiny_overrides, "--per_device_train_batch_size", "16",
                               "--num_train_epochs", "2", "--eval_steps", "3", "--save_steps", "3",
                               "--disable_tqdm", "true"])
    return folder, printed.getvalue()


def image_tree(root, paths, size=(10, 12)):
    """Tiny PNGs at `paths` (relative to `root`), each of another colour; a path ending in "/" is an empty folder."""
    from PIL import Image

    for index, path in enumerate(paths):
        if path.endswith("/"):
            (root / path).mkdir(parents=True, exist_ok=True)
            continue
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", size, (index * 20 % 256, 0, 0)).save(root / path)
    return root

"""Shared fixtures: tiny configurations (fast on 2 CPU cores), fixed inputs, parameter perturbation."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if importlib.util.find_spec("mae_hf") is None:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(ROOT))

from fixtures_runs import TINY_MODEL as TINY  # noqa: E402

import mae_hf  # noqa: E402

NUM_PATCHES = 16  # TINY: 8x8 images, 2x2 patches, a 4x4 grid of patches of 12 values each


def make_tiny_config(**overrides) -> mae_hf.MAEConfig:
    return mae_hf.MAEConfig(**{**TINY, **overrides})


@torch.no_grad()
def perturb_(model: torch.nn.Module, scale: float = 0.1, skip=()) -> torch.nn.Module:
    """Add N(0, scale) noise to every parameter (biases and LayerNorms stop being 0 / 1), except names in `skip`."""
    for name, param in model.named_parameters():
        if name not in skip:
            param.add_(scale * torch.randn_like(param))
    return model


@pytest.fixture
def tiny_config():
    """`tiny_config(**overrides)` -> an `MAEConfig` with the TINY sizes."""
    return make_tiny_config


@pytest.fixture
def perturb():
    return perturb_


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def pixel_values():
    return torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))


@pytest.fixture
def noise():
    return torch.rand(2, NUM_PATCHES, generator=torch.Generator().manual_seed(2))


@pytest.fixture(scope="session")
def repo_root():
    return ROOT


from fixtures_runs import parquet_folder, pretrained_run, scripts, tiny_overrides  # noqa: E402,F401

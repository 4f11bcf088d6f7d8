"""Data larger than memory: prepared folders (scripts/prepare_data.py), images read from disk by DataLoader workers,
one memory policy, exact resumes after kill -9, each image at most once per epoch across processes."""

import json
import os
import signal
import subprocess
import sys

import datasets
import numpy as np
import pytest
import torch
from fixtures_runs import TINY_MODEL
from PIL import Image

from mae_hf.data import DataArguments, load_image_splits
from mae_hf.data.prepared import PREPARED_MANIFEST
from mae_hf.data.sources import list_image_folder
from mae_hf.data.streaming import fit_workers_to_shared_memory

SIZES = [(10, 14), (14, 10), (12, 12), (9, 16)]  # (height, width): landscape, portrait, square, wide
TINY = ",".join(f"{key}={value}" for key, value in TINY_MODEL.items())
# A pretraining run as a subprocess that logs every batch a split reads (split, process rank, positions; in the
# DataLoader workers), the batch each training step trains on (step, positions; in the training process), and can
# kill itself with SIGKILL at a given step (after that step's checkpoint, if any, was written).
LOGGED_RUN = """
import json, os, signal, sys
sys.path.insert(0, os.path.join(os.getcwd(), "scripts"))
import pretrain
import torch
from transformers import TrainerCallback
import mae_hf.training as training
from mae_hf.data import ImageDataset
from mae_hf.data.streaming import StreamedImages

log, kill_at = os.environ["READ_LOG"], int(os.environ.get("KILL_AT_STEP", "0"))
read, fetch, prepare = StreamedImages.read, ImageDataset.__getitems__, training.ImageTrainer._prepare_inputs

def write(entry):
    with open(log, "a") as handle:
        handle.write(json.dumps(entry) + "\\n")

def logged_read(self, positions):
    write({"split": self.split, "rank": os.environ.get("RANK", "0"), "positions": [int(p) for p in positions]})
    return read(self, positions)

def tagged_fetch(self, indices):
    return {**fetch(self, indices), "read_positions": torch.as_tensor(indices)}

def logged_prepare(self, inputs):
    positions = inputs.pop("read_positions")
    if self.model.training:
        write({"step": self.state.global_step + 1, "positions": positions.tolist()})
    return prepare(self, inputs)

StreamedImages.read, ImageDataset.__getitems__ = logged_read, tagged_fetch
training.ImageTrainer._prepare_inputs = logged_prepare

class Kill(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

init = training.MAEPretrainer.__init__
def with_kill(self, *args, **kwargs):
    init(self, *args, **kwargs)
    self.add_callback(Kill())
training.MAEPretrainer.__init__ = with_kill
pretrain.main(sys.argv[1:])
"""


def mixed_split(num_images: int, seed: int) -> datasets.Dataset:
    """Images of four shapes (SIZES) and two modes, labels cycling through 3 classes."""
    rng = np.random.default_rng(seed)
    images = [Image.fromarray(rng.integers(0, 256, (*SIZES[i % 4], 3), dtype=np.uint8)).convert(
        "L" if i % 5 == 0 else "RGB") for i in range(num_images)]
    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b", "c"])})
    return datasets.Dataset.from_dict({"img": images, "label": [i % 3 for i in range(num_images)]},
                                      features=features)


@pytest.fixture(scope="module")
def mixed_source(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mixed")
    mixed_split(50, seed=0).to_parquet(str(folder / "train.parquet"))
    mixed_split(12, seed=1).to_parquet(str(folder / "test.parquet"))
    return folder


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, scripts, mixed_source):
    folder = tmp_path_factory.mktemp("prepared") / "out"
    scripts.prepare_data.main(["--dataset_name", str(mixed_source), "--output_dir", str(folder), "--short_side", "8",
                               "--shard_size", "16", "--num_proc", "2", "--disable_tqdm", "true"])
    return folder


def pretrain_args(output, data, *extra):
    return ["--output_dir", str(output), "--dataset_name", str(data), "--config_overrides", TINY,
            "--per_device_train_batch_size", "8", "--logging_steps", "1", "--disable_tqdm", "true",
            "--knn_eval", "false", *extra]


def losses(folder) -> dict:
    history = json.loads((folder / "trainer_state.json").read_text())["log_history"]
    return {entry["step"]: entry["loss"] for entry in history if "loss" in entry}


def test_prepared_folder_keeps_aspect_and_datasets_reads_it(prepared, mixed_source):
    manifest = json.loads((prepared / PREPARED_MANIFEST).read_text())
    assert manifest["complete"] and manifest["settings"]["encoding"] == "raw"  # short side 8: small, stored raw
    assert [shard["rows"] for shard in manifest["splits"]["train"]["shards"]] == [16, 16, 16, 2]
    assert manifest["splits"]["train"]["class_names"] == ["a", "b", "c"]
    loaded = datasets.load_dataset(str(prepared))  # plain `datasets` reads the folder too
    assert loaded["train"].num_rows == 50 and loaded["test"].num_rows == 12
    rows = loaded["train"].select(range(4))
    # aspect kept: short side 8, long side at most 12 (1.5 x 8), so 9 x 16 becomes 7 x 12
    assert list(zip(rows["height"], rows["width"])) == [(8, 11), (11, 8), (8, 8), (7, 12)]
    assert loaded["train"]["label"][:4] == [0, 1, 2, 0] and loaded["train"]["source_row"][:4] == [0, 1, 2, 3]


def test_both_paths_hold_the_same_pictures(prepared, mixed_source):
    from_disk, _ = load_image_splits(DataArguments(dataset_name=str(prepared), data_in_memory="false"), 8,
                                     num_workers=0)
    in_memory, _ = load_image_splits(DataArguments(dataset_name=str(prepared), data_in_memory="true"), 8)
    source, _ = load_image_splits(DataArguments(dataset_name=str(mixed_source), data_in_memory="true"), 8)
    assert not from_disk.in_memory and in_memory.in_memory and from_disk.canvas == in_memory.canvas == (3, 11, 12)
    for data in (in_memory, source):
        images, sizes = data.read(range(10))
        reference, reference_sizes = from_disk.read(range(10))
        assert torch.equal(images, reference) and torch.equal(sizes, reference_sizes)
    assert sizes[:4].tolist() == [[8, 11], [11, 8], [8, 8], [7, 12]]
    padded = images[0]  # an 8 x 11 image on an 11 x 12 canvas: the rest repeats its last row and column
    assert torch.equal(padded[:, 8:, :], padded[:, 7:8, :].expand(-1, 3, -1))
    assert torch.equal(padded[:, :8, 11:], padded[:, :8, 10:11])


def test_pretraining_from_disk_with_workers_gives_the_batches_of_memory(tmp_path, scripts, prepared, capsys):
    """Workers only decode: neither they nor where the images are held change a batch."""
    scripts.pretrain.main(pretrain_args(tmp_path / "memory", prepared, "--num_train_epochs", "2",
                                        "--data_in_memory", "true"))
    assert "[data] in memory" in capsys.readouterr().out
    scripts.pretrain.main(pretrain_args(tmp_path / "disk", prepared, "--num_train_epochs", "2",
                                        "--data_in_memory", "false", "--dataloader_num_workers", "2"))
    out = capsys.readouterr().out
    assert "[data] from disk: 50 + 12 images of prepared folder" in out and "2 DataLoader worker(s)" in out
    assert losses(tmp_path / "memory") == losses(tmp_path / "disk") and len(losses(tmp_path / "disk")) == 12
    summary = json.loads((tmp_path / "disk" / "pretraining_summary.json").read_text())
    assert summary["data_in_memory"] is False and summary["dataloader_num_workers"] == 2


def run_logged(tmp_path, repo_root, output, data, *extra, kill_at=0, log="reads.jsonl", launcher=()):
    (tmp_path / "logged_run.py").write_text(LOGGED_RUN)
    command = [sys.executable, *launcher, str(tmp_path / "logged_run.py"), *pretrain_args(output, data, *extra)]
    environment = dict(os.environ, OMP_NUM_THREADS="1", READ_LOG=str(tmp_path / log), KILL_AT_STEP=str(kill_at))
    return subprocess.run(command, cwd=repo_root, env=environment, capture_output=True, text=True)


def batches(tmp_path, log: str, split: str = "train") -> list[list[int]]:
    """The batches the DataLoader workers read from `split`, in the order they logged them."""
    lines = (tmp_path / log).read_text().splitlines()
    return [entry["positions"] for entry in map(json.loads, lines) if entry.get("split") == split]


def trained(tmp_path, log: str) -> dict:
    """{step: the positions of the batch it trained on}."""
    lines = (tmp_path / log).read_text().splitlines()
    return {entry["step"]: entry["positions"] for entry in map(json.loads, lines) if "step" in entry}


def test_kill9_mid_epoch_and_at_an_epoch_boundary_then_resume_gives_the_same_losses(tmp_path, repo_root, prepared):
    """50 images, batches of 8: 6 steps an epoch, 18 in 3 epochs; checkpoints every 3 steps (the last two kept),
    SIGKILL at step 14. Resuming from checkpoint-9 (mid-epoch 2) and checkpoint-12 (end of epoch 2), with
    persistent workers, gives the uninterrupted run's losses, and no batch before the checkpoint is read again."""
    flags = ("--num_train_epochs", "3", "--save_steps", "3", "--eval_steps", "6", "--data_in_memory", "false",
             "--dataloader_num_workers", "2")
    straight = run_logged(tmp_path, repo_root, tmp_path / "straight", prepared, *flags, log="straight.jsonl")
    assert straight.returncode == 0, straight.stderr[-3000:]
    killed = run_logged(tmp_path, repo_root, tmp_path / "killed", prepared, *flags, kill_at=14, log="killed.jsonl")
    assert killed.returncode == -signal.SIGKILL
    assert sorted(name for name in os.listdir(tmp_path / "killed") if name.startswith("checkpoint")) == \
        ["checkpoint-12", "checkpoint-9"]
    expected, steps = losses(tmp_path / "straight"), trained(tmp_path, "straight.jsonl")
    # each step's batch read once (two workers log them in either order); prefetching never reads twice
    assert sorted(batches(tmp_path, "straight.jsonl")) == sorted(steps.values()) and len(steps) == 18
    for checkpoint in (9, 12):
        folder = tmp_path / f"resumed_{checkpoint}"
        subprocess.run(["cp", "-r", str(tmp_path / "killed"), str(folder)], check=True)
        log = f"resumed_{checkpoint}.jsonl"
        resumed = run_logged(tmp_path, repo_root, folder, prepared, *flags, "--resume_from_checkpoint",
                             str(folder / f"checkpoint-{checkpoint}"), log=log)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        got = losses(folder)
        assert {step: got[step] for step in range(checkpoint + 1, 19)} == \
            {step: expected[step] for step in range(checkpoint + 1, 19)}, checkpoint
        assert trained(tmp_path, log) == {step: steps[step] for step in range(checkpoint + 1, 19)}
        # the batches of the steps before the checkpoint were skipped unread
        assert sorted(batches(tmp_path, log)) == sorted(steps[step] for step in range(checkpoint + 1, 19))


def test_two_processes_read_each_image_at_most_once_per_epoch(tmp_path, repo_root, prepared):
    result = run_logged(tmp_path, repo_root, tmp_path / "ddp", prepared, "--num_train_epochs", "2",
                        "--data_in_memory", "false", "--dataloader_num_workers", "1", "--eval_steps", "3",
                        launcher=("-m", "torch.distributed.run", "--nproc_per_node", "2"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "x2" in result.stdout
    reads = [json.loads(line) for line in (tmp_path / "reads.jsonl").read_text().splitlines()]
    train = [entry for entry in reads if entry.get("split") == "train"]
    assert {entry["rank"] for entry in train} == {"0", "1"} and len(train) == 12  # 3 steps x 2 ranks x 2 epochs
    for epoch in range(2):
        seen = [position for entry in train[epoch * 6:(epoch + 1) * 6] for position in entry["positions"]]
        assert len(seen) == len(set(seen)) == 48  # 50 images: 2 dropped, fewer than 2 processes x 8

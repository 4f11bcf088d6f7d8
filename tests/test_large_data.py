"""Data larger than memory: prepared folders (scripts/prepare_data.py), images read from disk by DataLoader workers,
one memory policy, exact resumes after kill -9, each image at most once per epoch across processes."""

import json
import os
import re
import shlex
import signal
import subprocess
import sys

import datasets
import numpy as np
import pytest
import torch
from fixtures_runs import TINY_MODEL, image_tree
from PIL import Image

from mae_hf.cli import UsageError, run_script
from mae_hf.data import DataArguments, load_image_splits
from mae_hf.data.prepared import PREPARED_MANIFEST
from mae_hf.data.sources import list_image_folder
from mae_hf.data.streaming import fit_workers_to_shared_memory
from mae_hf.runs import LOCK_NAME, RunError

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
    # from the source for a 7 px model: stored at short side 8 (room for a 7 px centre crop), as the folder
    source, _ = load_image_splits(DataArguments(dataset_name=str(mixed_source), data_in_memory="true"), 7)
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


# ---- preparing: interruptions, reruns, bad images, listing -----------------------------------------------------

PREPARE_KILLED = """
import os, signal, sys
sys.path.insert(0, os.path.join(os.getcwd(), "scripts"))
import prepare_data
import mae_hf.data.prepare as prepare
shard, done = prepare.prepare_shard, []

def killed_after_two(task):
    if len(done) == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    done.append(shard(task))
    return done[-1]

prepare.prepare_shard = killed_after_two
prepare_data.main(sys.argv[1:])
"""


def test_a_half_prepared_folder_is_refused_then_finished_keeping_its_shards(tmp_path, repo_root, scripts,
                                                                            mixed_source, capsys):
    output = tmp_path / "half"
    flags = ["--dataset_name", str(mixed_source), "--output_dir", str(output), "--short_side", "8", "--shard_size",
             "16", "--num_proc", "1", "--disable_tqdm", "true"]
    (tmp_path / "killed.py").write_text(PREPARE_KILLED)
    killed = subprocess.run([sys.executable, str(tmp_path / "killed.py"), *flags], cwd=repo_root,
                            capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL
    assert sorted(path.name for path in output.iterdir()) == [".preparing", ".run.lock"]  # no dataset yet
    first = sorted((output / ".preparing" / "train").iterdir())
    assert [path.name for path in first] == ["data-00000-of-00004.arrow", "data-00001-of-00004.arrow"]
    inodes = [path.stat().st_ino for path in first]
    with pytest.raises(SystemExit) as stop:  # training from it: one clear error naming what to run
        run_script(scripts.pretrain.main, pretrain_args(tmp_path / "run", output, "--num_train_epochs", "1"))
    message = capsys.readouterr().err
    assert stop.value.code == 1 and message.startswith("error: ") and "is only partly prepared" in message
    assert "python scripts/prepare_data.py --dataset_name" in message
    scripts.prepare_data.main(flags)  # the same command again finishes it
    out = capsys.readouterr().out
    assert "continuing" in out and "2 finished shard(s) (32 images) kept, 3 to go" in out
    assert [path.stat().st_ino for path in sorted((output / "train").iterdir())[:2]] == inodes  # not rewritten
    assert json.loads((output / PREPARED_MANIFEST).read_text())["complete"]
    assert sorted(path.name for path in output.iterdir()) == [PREPARED_MANIFEST, "test", "train"]


def test_a_finished_folder_is_never_overwritten_silently(tmp_path, scripts, prepared, mixed_source, capsys):
    before = (prepared / PREPARED_MANIFEST).read_text()
    flags = ["--dataset_name", str(mixed_source), "--short_side", "8", "--disable_tqdm", "true"]
    with pytest.raises(UsageError, match="already holds a finished prepared folder"):
        scripts.prepare_data.main([*flags, "--output_dir", str(prepared)])
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(UsageError, match="is not a prepared folder"):
        scripts.prepare_data.main([*flags, "--output_dir", str(other), "--overwrite", "true"])
    assert (other / "notes.txt").read_text() == "mine" and (prepared / PREPARED_MANIFEST).read_text() == before
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-r", str(prepared), str(copy)], check=True)
    scripts.prepare_data.main([*flags, "--output_dir", str(copy), "--short_side", "6", "--overwrite", "true"])
    assert json.loads((copy / PREPARED_MANIFEST).read_text())["settings"]["short_side"] == 6
    with pytest.raises(UsageError, match=f"lies inside {mixed_source}, the folder --dataset_name reads"):
        scripts.prepare_data.main([*flags, "--output_dir", str(mixed_source / "prepared")])


def test_a_single_file_s_prepared_folder_goes_beside_its_folder_never_inside(tmp_path, monkeypatch, scripts,
                                                                            mixed_source):
    import mae_hf.data as data
    from mae_hf.data.sources import default_prepared_folder

    monkeypatch.setattr(data, "memory_budget", lambda: (1000, "a test's budget"))
    single = mixed_source / "train.parquet"
    with pytest.raises(ValueError) as error:  # too large for memory: the printed command writes outside its folder
        load_image_splits(DataArguments(dataset_name=str(single)), 8)
    command = re.search(r"python scripts/prepare_data.py .*? --output_dir [^\s,]+", str(error.value)).group(0)
    assert command.endswith(f"--output_dir {mixed_source}_train_prepared")
    flags = ["--num_proc", "1", "--disable_tqdm", "true"]
    with pytest.raises(UsageError, match=rf"--output_dir {mixed_source}/prepared lies inside {mixed_source}, the "
                                         rf"folder --dataset_name reads.*--output_dir {mixed_source}_train_prepared"):
        scripts.prepare_data.main([*shlex.split(command)[2:-2], "--output_dir", str(mixed_source / "prepared"), *flags])
    scripts.prepare_data.main([*shlex.split(command)[2:], *flags])
    assert sorted(path.name for path in mixed_source.iterdir()) == ["test.parquet", "train.parquet"]
    train, test = load_image_splits(DataArguments(dataset_name=str(mixed_source), data_in_memory="true"), 8)
    assert (len(train), len(test)) == (50, 12)  # the folder still reads as itself
    tree = image_tree(tmp_path / "imagenet", ["train/a/0.png", "val/a/1.png"])  # beside the tree, not among its splits
    folders = DataArguments(train_dir=str(tree / "train"), validation_dir=str(tree / "val"))
    assert default_prepared_folder(folders) == f"{tree}_prepared"


def test_bad_images_in_a_source_to_prepare(tmp_path, scripts, capsys):
    source = tmp_path / "tree"
    for index in range(6):
        folder = source / ("cat" if index % 2 else "dog")
        folder.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (12, 10), (index * 40, 0, 0)).save(folder / f"{index}.png")
    (source / "dog" / "broken.png").write_bytes(b"not a png")
    flags = ["--train_dir", str(source), "--short_side", "8", "--disable_tqdm", "true", "--num_proc", "1"]
    with pytest.raises(ValueError, match=r"row \d+ \(.*broken.png\) cannot be decoded.*--skip_bad_images true"):
        scripts.prepare_data.main([*flags, "--output_dir", str(tmp_path / "strict")])
    scripts.prepare_data.main([*flags, "--output_dir", str(tmp_path / "lenient"), "--skip_bad_images", "true"])
    manifest = json.loads((tmp_path / "lenient" / PREPARED_MANIFEST).read_text())
    assert manifest["splits"]["train"]["num_images"] == 6 and manifest["splits"]["train"]["num_skipped"] == 1
    assert "broken.png" in manifest["splits"]["train"]["shards"][0]["skipped"][0]
    train, evaluation = load_image_splits(DataArguments(dataset_name=str(tmp_path / "lenient"),
                                                        validation_split_percentage=50), 8)
    assert len(train) + len(evaluation) == 6  # the broken image is listed once, in the split its row falls into
    assert sum("broken.png" in entry for entry in train.skipped + evaluation.skipped) == 1


@pytest.mark.parametrize("change, message", [
    ({"version": 0}, "prepared by another version of mae_hf"),
    ({"complete": False}, "is only partly prepared"),
])
def test_a_folder_of_another_version_or_unfinished_names_what_to_run(tmp_path, prepared, change, message):
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-r", str(prepared), str(copy)], check=True)
    manifest = json.loads((copy / PREPARED_MANIFEST).read_text())
    (copy / PREPARED_MANIFEST).write_text(json.dumps({**manifest, **change}))
    with pytest.raises(ValueError, match=message) as error:
        load_image_splits(DataArguments(dataset_name=str(copy)), 8)
    assert "python scripts/prepare_data.py" in str(error.value)


def test_a_damaged_shard_is_named(tmp_path, prepared):
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-r", str(prepared), str(copy)], check=True)
    shard = copy / "train" / "data-00001-of-00004.arrow"
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(ValueError, match="shard train/data-00001-of-00004.arrow is 100 bytes, not"):
        load_image_splits(DataArguments(dataset_name=str(copy)), 8)


def test_a_folder_prepared_smaller_than_the_model_warns_and_trains(prepared, capsys):
    train, _ = load_image_splits(DataArguments(dataset_name=str(prepared)), 16)
    err = capsys.readouterr().err
    assert "prepared with short side 8, below the model's 16 px" in err and "--short_side 18" in err
    assert len(train) == 50


def test_memory_policy_streams_or_names_the_prepare_command(monkeypatch, mixed_source, prepared, capsys):
    import mae_hf.data as data

    monkeypatch.setattr(data, "memory_budget", lambda: (1000, "a test's budget"))
    streamed, _ = load_image_splits(DataArguments(dataset_name=str(prepared)), 8, num_workers=0)
    assert not streamed.in_memory and "over the memory budget of 1.0 KB = a test's budget" in capsys.readouterr().out
    with pytest.raises(ValueError) as error:  # too large, not prepared: the exact command, before any work
        load_image_splits(DataArguments(dataset_name=str(mixed_source)), 8)
    assert f"python scripts/prepare_data.py --dataset_name {mixed_source} --short_side 9 --output_dir " \
           f"{mixed_source}_prepared" in str(error.value)
    forced, _ = load_image_splits(DataArguments(dataset_name=str(mixed_source), data_in_memory="true"), 8)
    assert forced.in_memory and "although over the budget" in capsys.readouterr().out
    from_source, _ = load_image_splits(DataArguments(dataset_name=str(mixed_source), data_in_memory="false"), 8,
                                       num_workers=0)  # an ordinary dataset read from disk: decoded on the fly
    assert not from_source.in_memory and "preparing them once is faster" in capsys.readouterr().err
    assert torch.equal(from_source.read([3, 1])[0], forced.read([3, 1])[0])


def test_image_folders_are_listed_like_datasets_imagefolder(tmp_path):
    for index in range(7):
        folder = tmp_path / "tree" / "train" / ("b_dogs" if index % 3 else "a_cats")
        folder.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (5, 4)).save(folder / f"{index}.jpg")
    (tmp_path / "tree" / "train" / "a_cats" / ".DS_Store").write_bytes(b"")
    (tmp_path / "tree" / "train" / "a_cats" / "notes.txt").write_text("not an image")
    ours = list_image_folder(str(tmp_path / "tree" / "train"))
    theirs = datasets.load_dataset("imagefolder", data_dir=str(tmp_path / "tree"), split="train")
    assert ours.features["label"].names == theirs.features["label"].names == ["a_cats", "b_dogs"]
    pairs = lambda dataset: sorted(  # noqa: E731
        (os.path.basename(image["path"] or image.filename), label)
        for image, label in zip(dataset.cast_column("image", datasets.Image(decode=False))["image"],
                                dataset["label"]))
    assert pairs(ours) == pairs(theirs)
    train, _ = load_image_splits(DataArguments(dataset_name=str(tmp_path / "tree"), validation_split_percentage=30),
                                 4)
    assert len(train) == 4 and train.class_names == ["a_cats", "b_dogs"]
    deeper = tmp_path / "tree" / "train" / "b_dogs" / "more"  # images in subfolders belong to their class
    deeper.mkdir()
    Image.new("RGB", (5, 4)).save(deeper / "7.jpg")
    listed = list_image_folder(str(tmp_path / "tree" / "train"))
    assert listed["label"].count(1) == 5 and listed.num_rows == 8


def test_shared_memory_too_small_for_the_batches_in_flight(capsys):
    batch = 100 * 2**20
    assert fit_workers_to_shared_memory(4, 2, batch, chosen=False, free=64 * 2**30) == (4, 2)
    assert fit_workers_to_shared_memory(4, 2, batch, chosen=False, free=2 * 2**30) == (2, 2)
    assert "docker run --shm-size" in capsys.readouterr().err
    with pytest.raises(ValueError, match="/dev/shm has 64 MB free.*--shm-size"):
        fit_workers_to_shared_memory(4, 2, batch, chosen=True, free=64 * 2**20)
    with pytest.raises(ValueError, match="lower --dataloader_num_workers"):
        fit_workers_to_shared_memory(1, 2, batch, chosen=False, free=64 * 2**20)


def test_probes_and_fine_tuning_read_prepared_folders_from_disk(tmp_path, scripts, prepared, capsys):
    """The probes' one encoder pass streams; kNN, probe and fine-tune give what the in-memory path gives."""
    for mode in ("true", "false"):
        scripts.linear_probe.main(["--dataset_name", str(prepared), "--config_overrides", TINY, "--output_dir",
                                   str(tmp_path / f"probe_{mode}"), "--probe_epochs", "2", "--knn_k", "3",
                                   "--disable_tqdm", "true", "--data_in_memory", mode,
                                   "--dataloader_num_workers", "2"])
    assert "[data] from disk" in capsys.readouterr().out
    for protocol in ("linear_probe", "knn"):
        results = [json.loads((tmp_path / f"probe_{mode}" / f"{protocol}_results.json").read_text())
                   for mode in ("true", "false")]
        assert results[0]["eval_accuracy"] == results[1]["eval_accuracy"]
    scripts.finetune.main(["--dataset_name", str(prepared), "--config_overrides", TINY, "--random_init", "true",
                           "--output_dir", str(tmp_path / "finetune"), "--per_device_train_batch_size", "8",
                           "--num_train_epochs", "1", "--disable_tqdm", "true", "--data_in_memory", "false",
                           "--dataloader_num_workers", "1"])
    assert json.loads((tmp_path / "finetune" / "finetune_results.json").read_text())["train_samples"] == 50


def test_decoding_on_the_device_gives_the_batches_of_the_workers(tmp_path, scripts, mixed_source, monkeypatch):
    """--decode_on_device: the workers read JPEG bytes, the device decodes (here PIL stands in for torchvision's
    GPU decoder, which this machine lacks) into canvases that train as the workers' canvases do."""
    import io

    import mae_hf.data.streaming as streaming

    jpegs = tmp_path / "jpegs"
    scripts.prepare_data.main(["--dataset_name", str(mixed_source), "--output_dir", str(jpegs), "--short_side", "8",
                               "--encoding", "jpeg", "--num_proc", "1", "--disable_tqdm", "true"])
    flags = ("--num_train_epochs", "1", "--data_in_memory", "false", "--dataloader_num_workers", "1")
    with pytest.raises(ValueError, match="decodes JPEGs on a CUDA GPU; this run's device is cpu"):
        scripts.pretrain.main(pretrain_args(tmp_path / "refused", jpegs, *flags, "--decode_on_device", "true"))
    from mae_hf.cli import UsageError

    with pytest.raises(UsageError, match="these images are held in memory"):
        scripts.pretrain.main(pretrain_args(tmp_path / "memory", jpegs, "--decode_on_device", "true"))

    def pil_decoder(device):
        def decode(datas, channels):
            return [torch.from_numpy(np.array(Image.open(io.BytesIO(data.numpy().tobytes())).convert(
                "RGB" if channels == 3 else "L"))).permute(2, 0, 1) for data in datas]
        return decode

    monkeypatch.setattr(streaming, "torchvision_jpeg_decoder", pil_decoder)
    scripts.pretrain.main(pretrain_args(tmp_path / "device", jpegs, *flags, "--decode_on_device", "true"))
    scripts.pretrain.main(pretrain_args(tmp_path / "workers", jpegs, *flags))
    device, workers = losses(tmp_path / "device"), losses(tmp_path / "workers")
    assert device.keys() == workers.keys() and len(device) == 6
    for step in device:  # canvases of another size: the same pixels sampled, up to float rounding
        assert device[step] == pytest.approx(workers[step], rel=1e-4)


# ---- ImageNet-scale presets ------------------------------------------------------------------------------------

# The published checkpoints' architectures (their config.json on the Hub): hidden size, blocks, heads, MLP width,
# patch; every one with a decoder of width 512, 8 blocks, 16 heads, MLP 2048, at 224 px.
PUBLISHED = {"base": (768, 12, 12, 3072, 16), "large": (1024, 24, 16, 4096, 16), "huge": (1280, 32, 16, 5120, 14)}


@pytest.mark.parametrize("size", sorted(PUBLISHED))
def test_imagenet_presets_are_the_papers_recipes_on_the_published_architectures(tmp_path, repo_root, size):
    from mae_hf.cli import parse_args
    from mae_hf.convert import config_to_vit_mae
    from mae_hf.loading import ModelArguments, build_config
    from mae_hf.training_args import PretrainingArguments

    model_args, _, args = parse_args((ModelArguments, DataArguments, PretrainingArguments), [
        str(repo_root / "configs" / f"imagenet_mae_vit_{size}_pretrain.yaml"), "--output_dir", str(tmp_path)])
    vit = config_to_vit_mae(build_config(model_args))
    assert (vit.hidden_size, vit.num_hidden_layers, vit.num_attention_heads, vit.intermediate_size,
            vit.patch_size) == PUBLISHED[size]
    assert (vit.image_size, vit.decoder_hidden_size, vit.decoder_num_hidden_layers, vit.decoder_num_attention_heads,
            vit.decoder_intermediate_size, vit.qkv_bias, vit.norm_pix_loss, vit.mask_ratio) == \
        (224, 512, 8, 16, 2048, True, True, 0.75)
    assert args.global_batch_size == 4096 and args.learning_rate == pytest.approx(1.5e-4 * 4096 / 256)
    assert (args.adam_beta1, args.adam_beta2, args.weight_decay, args.num_train_epochs, args.warmup_steps) == \
        (0.9, 0.95, 0.05, 800, 0.05)
    assert build_config(model_args).image_mean == [0.485, 0.456, 0.406]


def test_imagenet_finetune_preset_and_the_total_batch(tmp_path, repo_root):
    from mae_hf.cli import parse_args
    from mae_hf.loading import ModelArguments
    from mae_hf.training_args import FinetuneArguments

    preset = str(repo_root / "configs" / "imagenet_mae_vit_base_finetune.yaml")
    _, _, args = parse_args((ModelArguments, DataArguments, FinetuneArguments), [preset, "--output_dir",
                                                                                  str(tmp_path)])
    assert (args.global_batch_size, args.gradient_accumulation_steps) == (1024, 8)
    assert args.learning_rate == pytest.approx(5e-4 * 1024 / 256)
    assert (args.layer_decay, args.drop_path_rate, args.label_smoothing_factor, args.random_erasing, args.mixup_alpha,
            args.cutmix_alpha, args.randaugment_magnitude, args.weight_decay) == (0.65, 0.1, 0.1, 0.25, 0.8, 1.0, 9,
                                                                                  0.05)
    with pytest.raises(SystemExit):  # 1000 is no multiple of 128 images per step: a usage error
        parse_args((ModelArguments, DataArguments, FinetuneArguments),
                   [preset, "--output_dir", str(tmp_path), "--total_train_batch_size", "1000"])


def test_data_benchmarks_run_at_a_tiny_scale(tmp_path):
    """The data-path suites of scripts/benchmark.py (their figures are measured elsewhere, see docs): they run and
    record what they print."""
    from mae_hf.benchmark import main

    common = ["--data_dir", str(tmp_path), "--data_image_size", "32", "--output_json"]
    main(["--suite", "data", "--data_sizes", "24", "48", "--data_workers", "1", "--batch_size", "8", *common,
          str(tmp_path / "data.json")])
    record = json.loads((tmp_path / "data.json").read_text())
    for size in ("24", "48"):
        for loader in ("mae_hf", "run_mae.py"):
            figures = record["results"][size][loader]
            assert figures["images"] > 0 and figures["images_per_worker_cpu_second"] > 0
            assert figures["peak_pss_mb"] > 0
    main(["--suite", "listing", "--listing_files", "1500", *common, str(tmp_path / "listing.json")])
    assert json.loads((tmp_path / "listing.json").read_text())["images"] == 1500
    main(["--suite", "memory", "--memory_sizes", "8", "24", *common, str(tmp_path / "memory.json")])
    rows = json.loads((tmp_path / "memory.json").read_text())["rows"]
    assert [row["images"] for row in rows] == [8, 24] and rows[1]["pixels"] > rows[0]["pixels"]


def test_a_card_names_the_hub_dataset_a_folder_was_prepared_from(prepared):
    from mae_hf.data.prepared import prepared_source
    from mae_hf.publish import data_description, resolve_dataset_id

    assert prepared_source(str(prepared))["dataset_name"].endswith("mixed0") and prepared_source("elsewhere") is None
    summary = {"dataset_name": str(prepared), "train_split": "train", "train_samples": 50,
               "prepared_from": {"dataset_name": "user/photos"}}
    assert resolve_dataset_id(summary, None) == "user/photos"
    assert data_description(summary, "user/photos").startswith(f"user/photos (local prepared copy at `{prepared}`)")


# ---- what the review of the data path asked for ----------------------------------------------------------------

def test_a_source_and_its_prepared_copy_hold_out_and_draw_the_same_images(tmp_path, scripts):
    """Holding out and drawing happen among the source's rows, images left out while preparing included: the
    prepared copy selects exactly the source's images (less the bad ones), and lists each skipped image once."""
    source = tmp_path / "tree"
    for index in range(30):
        folder = source / f"c{index % 3}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((10, 12, 3), index * 8, dtype=np.uint8)).save(folder / f"{index:02d}.png")
    for bad in ("c0/03.png", "c1/19.png"):
        (source / bad).write_bytes(b"broken")
    scripts.prepare_data.main(["--train_dir", str(source), "--output_dir", str(tmp_path / "prepared"), "--short_side",
                               "9", "--skip_bad_images", "true", "--num_proc", "1", "--disable_tqdm", "true"])
    for flags in ({"validation_split_percentage": 30}, {"validation_split_percentage": 30, "max_train_samples": 9},
                  {"validation_split_percentage": 20, "max_eval_samples": 4}):
        chosen = {}
        for name, data in (("source", {"train_dir": str(source)}),
                           ("prepared", {"dataset_name": str(tmp_path / "prepared")})):
            train, evaluation = load_image_splits(DataArguments(**data, skip_bad_images=True, **flags), 8)
            # each image's grey level says which file it is
            chosen[name] = [sorted(split.read(range(len(split)))[0][:, 0, 0, 0].tolist()) for split in (train,
                                                                                                      evaluation)]
            chosen[name + " skipped"] = sorted(train.skipped + evaluation.skipped)
        assert chosen["source"] == chosen["prepared"], flags
        assert len(chosen["prepared skipped"]) == len(chosen["source skipped"]) <= 2


def test_a_prepared_folder_s_skipped_images_reach_the_summary_without_the_flag(tmp_path, scripts):
    source = tmp_path / "tree"
    for index in range(20):
        folder = source / f"c{index % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (10, 10), (index * 10, 0, 0)).save(folder / f"{index:02d}.png")
    (source / "c0" / "00.png").write_bytes(b"")
    scripts.prepare_data.main(["--train_dir", str(source), "--output_dir", str(tmp_path / "prepared"), "--short_side",
                               "9", "--skip_bad_images", "true", "--num_proc", "1", "--disable_tqdm", "true"])
    scripts.pretrain.main(pretrain_args(tmp_path / "run", tmp_path / "prepared", "--num_train_epochs", "1",
                                        "--per_device_train_batch_size", "4", "--validation_split_percentage", "20"))
    summary = json.loads((tmp_path / "run" / "pretraining_summary.json").read_text())
    listed = [entry for entries in summary["skipped_images"].values() for entry in entries]
    assert len(listed) == 1 and "00.png" in listed[0]
    assert summary["eval_crop_fraction"] == 8 / 9 and summary["stored_short_side"] == 9


def test_a_bad_image_read_from_its_source_during_training_is_one_clear_line(tmp_path, repo_root, scripts, capsys):
    source = tmp_path / "tree"
    for index in range(16):
        folder = source / f"c{index % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (10, 10), (index * 10, 0, 0)).save(folder / f"{index:02d}.jpg", quality=95)
    data = (source / "c1" / "05.jpg").read_bytes()
    (source / "c1" / "05.jpg").write_bytes(data[:len(data) // 2])  # a header that reads, pixels that do not
    flags = ["--output_dir", str(tmp_path / "run"), "--train_dir", str(source), "--config_overrides", TINY,
             "--data_in_memory", "false", "--validation_split_percentage", "25", "--knn_eval", "false",
             "--disable_tqdm", "true", "--per_device_train_batch_size", "4"]
    with pytest.raises(ValueError, match="--skip_bad_images true with images read from their source"):
        scripts.pretrain.main([*flags, "--skip_bad_images", "true"])
    result = subprocess.run([sys.executable, "scripts/pretrain.py", *flags, "--num_train_epochs", "2",
                             "--dataloader_num_workers", "1"],
                            cwd=repo_root, capture_output=True, text=True)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "05.jpg" in last and "cannot be decoded" in last, last


def test_preparing_checks_labels_and_splits_before_any_work(tmp_path, scripts, mixed_source, prepared):
    strings = tmp_path / "strings"
    strings.mkdir()
    datasets.Dataset.from_dict({"img": [Image.new("RGB", (4, 4))] * 4, "label": ["cat", "dog"] * 2},
                               features=datasets.Features({"img": datasets.Image(), "label": datasets.Value(
                                   "string")})).to_parquet(str(strings / "train.parquet"))
    with pytest.raises(ValueError, match="holds string values, not integer class indices"):
        scripts.prepare_data.main(["--dataset_name", str(strings), "--output_dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()
    scripts.prepare_data.main(["--dataset_name", str(mixed_source), "--output_dir", str(tmp_path / "one"),
                               "--splits", "train,test", "--short_side", "8", "--disable_tqdm", "true"])
    assert sorted(json.loads((tmp_path / "one" / PREPARED_MANIFEST).read_text())["splits"]) == ["test", "train"]
    with pytest.raises(ValueError, match="is already a prepared folder.*prepare them from its source"):
        scripts.prepare_data.main(["--dataset_name", str(prepared), "--output_dir", str(tmp_path / "again")])


def test_a_prepared_folder_s_labels_are_its_label_column(tmp_path, scripts, prepared):
    with pytest.raises(ValueError, match="a prepared folder, whose labels are its column 'label'"):
        load_image_splits(DataArguments(dataset_name=str(prepared), label_column_name="source_row"), 8,
                          require_labels=True)
    unlabelled = tmp_path / "unlabelled"
    for index in range(12):
        unlabelled.mkdir(exist_ok=True)
        Image.new("RGB", (10, 10)).save(unlabelled / f"{index}.png")
    scripts.prepare_data.main(["--train_dir", str(unlabelled), "--output_dir", str(tmp_path / "prepared_unlabelled"),
                               "--short_side", "8", "--num_proc", "1", "--disable_tqdm", "true"])
    with pytest.raises(ValueError, match="was prepared without labels"):
        load_image_splits(DataArguments(dataset_name=str(tmp_path / "prepared_unlabelled")), 8, require_labels=True)
    train, _ = load_image_splits(DataArguments(dataset_name=str(tmp_path / "prepared_unlabelled")), 8)
    assert train.labels is None


def test_output_folder_problems_are_usage_errors_before_the_source_is_read(tmp_path, scripts, monkeypatch):
    flags = ["--dataset_name", "nobody/no-such-dataset", "--disable_tqdm", "true"]  # never read: no network
    (tmp_path / "file").write_text("")
    with pytest.raises(UsageError, match="is a file, not a folder"):
        scripts.prepare_data.main([*flags, "--output_dir", str(tmp_path / "file")])
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    with pytest.raises(UsageError, match=rf"--output_dir {tmp_path}/new/out: {tmp_path} cannot be written"):
        scripts.prepare_data.main([*flags, "--output_dir", str(tmp_path / "new" / "out")])
    with pytest.raises(SystemExit) as stop:  # a flag out of range is named
        scripts.prepare_data.main([*flags, "--output_dir", str(tmp_path / "out"), "--short_side", "0"])
    assert stop.value.code == 2


def test_an_evaluation_folder_without_a_rare_class_is_numbered_by_the_union(tmp_path, scripts, capsys):
    tree = image_tree(tmp_path / "tree", ["train/cat/0.png", "train/dog/1.png", "train/rare/2.png",
                                          "val/cat/3.png", "val/dog/4.png"])
    data = DataArguments(train_dir=str(tree / "train"), validation_dir=str(tree / "val"))
    train, evaluation = load_image_splits(data, 8, require_labels=True)  # a classifier: cat, dog, rare everywhere
    assert train.class_names == evaluation.class_names == ["cat", "dog", "rare"]
    assert train.labels.tolist() == [0, 1, 2] and evaluation.labels.tolist() == [0, 1]
    assert f"warning: {tree}/val has no folder for 1 class(es) of the other split(s): rare." in capsys.readouterr().err
    scripts.prepare_data.main(["--dataset_name", str(tree), "--short_side", "8", "--num_proc", "1",
                               "--disable_tqdm", "true", "--output_dir", str(tmp_path / "out")])
    assert "val has no folder for 1 class(es) of the other split(s): rare" in capsys.readouterr().err
    prepared_train, prepared_val = load_image_splits(DataArguments(dataset_name=str(tmp_path / "out")), 8)
    assert prepared_val.class_names == ["cat", "dog", "rare"] and prepared_val.labels.tolist() == [0, 1]
    image_tree(tree, ["val/frog/5.png"])  # a class only the evaluation split has: a classifier could never predict it
    with pytest.raises(ValueError, match="classes that the training split does not have"):
        load_image_splits(data, 8, require_labels=True)


def test_an_unlabelled_validation_folder_beside_a_labelled_training_folder(tmp_path, scripts, capsys):
    tree = image_tree(tmp_path / "imagenet", [f"train/{name}/{index}.png" for name in "ab" for index in range(3)]
                      + [f"val/{index}.png" for index in range(4)])
    data = DataArguments(train_dir=str(tree / "train"), validation_dir=str(tree / "val"))
    train, evaluation = load_image_splits(data, 8)  # pretraining: evaluated on, unlabelled (no kNN monitor)
    assert train.labels.tolist() == [0, 0, 0, 1, 1, 1] and evaluation.labels.tolist() == [-1] * 4
    layout = rf"--validation_dir {tree}/val has no class subfolders.*{tree}/val/<class>/image.jpg"
    with pytest.raises(ValueError, match=layout):  # the probes, kNN and fine-tuning: up front
        load_image_splits(data, 8, require_labels=True)
    output = tmp_path / "prepared"
    scripts.prepare_data.main(["--train_dir", str(tree / "train"), "--validation_dir", str(tree / "val"),
                               "--output_dir", str(output), "--short_side", "8", "--num_proc", "1",
                               "--disable_tqdm", "true"])
    assert "note: " in capsys.readouterr().err
    prepared = DataArguments(dataset_name=str(output))
    assert load_image_splits(prepared, 8)[1].labels.tolist() == [-1] * 4
    with pytest.raises(ValueError, match=layout + ".*prepare"):
        load_image_splits(prepared, 8, require_labels=True)


def test_a_bad_image_then_skip_bad_images_continues_and_other_settings_are_named(tmp_path, scripts, capsys):
    tree = image_tree(tmp_path / "tree", [f"{name}/{index}.png" for name in "ab" for index in range(4)])
    (tree / "b" / "9.png").write_bytes(b"not a png")
    flags = ["--train_dir", str(tree), "--short_side", "8", "--shard_size", "2", "--num_proc", "1",
             "--disable_tqdm", "true", "--output_dir", str(tmp_path / "out")]
    with pytest.raises(ValueError, match=r"9.png\) cannot be decoded.* The 4 finished shard\(s\) in .* are kept: "
                                         "the same command \\(with --skip_bad_images true added"):
        scripts.prepare_data.main(flags)
    with pytest.raises(UsageError, match=r"other data or settings \(max_long_side: 12 there, 9 now; short_side: 8 "
                                         r"there, 6 now\)\. Continue"):
        scripts.prepare_data.main([*flags, "--short_side", "6"])
    scripts.prepare_data.main([*flags, "--skip_bad_images", "true"])
    assert "4 finished shard(s) (8 images) kept" in capsys.readouterr().out
    manifest = json.loads((tmp_path / "out" / PREPARED_MANIFEST).read_text())
    assert manifest["splits"]["train"]["num_skipped"] == 1 and "--skip_bad_images true" in manifest["command"]


PREPARE_SLOWLY = """
import os, sys, time
sys.path.insert(0, os.path.join(os.getcwd(), "scripts"))
import prepare_data
from mae_hf.data import prepare

shard = prepare.prepare_shard

def slow(task):
    time.sleep(0.3)
    return shard(task)

prepare.prepare_shard = slow
prepare_data.main(sys.argv[1:])
"""


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGKILL])
def test_stopping_a_parallel_preparation_prints_no_worker_traceback(tmp_path, repo_root, stop):
    import time

    tree = image_tree(tmp_path / "tree", [f"{name}/{index}.png" for name in "ab" for index in range(12)])
    (tmp_path / "slow.py").write_text(PREPARE_SLOWLY)
    output = tmp_path / "out"
    process = subprocess.Popen([sys.executable, str(tmp_path / "slow.py"), "--train_dir", str(tree), "--output_dir",
                                str(output), "--short_side", "8", "--shard_size", "1", "--num_proc", "2",
                                "--disable_tqdm", "true"], cwd=repo_root, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 60
    progress = output / ".preparing" / "progress"
    while len(list(progress.glob("*.json")) if progress.is_dir() else []) < 2:
        assert time.time() < deadline and process.poll() is None
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGINT) if stop == signal.SIGINT else process.kill()  # Ctrl-C: the whole group
    _, err = process.communicate(timeout=60)
    assert "Traceback" not in err and "ForkPoolWorker" not in err, err
    if stop == signal.SIGINT:
        assert process.returncode == 130
        kept = len(list(progress.glob("*.json")))
        assert f"error: interrupted: {kept} of 24 shards are finished and kept" in err, err


def test_a_second_preparation_into_the_same_folder_is_refused_naming_the_first(tmp_path, repo_root, scripts,
                                                                                capsys):
    import time

    tree = image_tree(tmp_path / "tree", [f"{name}/{index}.png" for name in "ab" for index in range(6)])
    (tmp_path / "slow.py").write_text(PREPARE_SLOWLY)
    output = tmp_path / "out"
    flags = ["--train_dir", str(tree), "--output_dir", str(output), "--short_side", "8", "--shard_size", "1",
             "--num_proc", "1", "--disable_tqdm", "true"]
    first = subprocess.Popen([sys.executable, str(tmp_path / "slow.py"), *flags], cwd=repo_root,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    progress, deadline = output / ".preparing" / "progress", time.time() + 60
    while len(list(progress.glob("*.json")) if progress.is_dir() else []) < 1:
        assert time.time() < deadline and first.poll() is None
        time.sleep(0.05)
    with pytest.raises(RunError, match=rf"--output_dir {output} is in use by another run \(pid {first.pid} on "):
        scripts.prepare_data.main(flags)
    first.kill()
    first.communicate(timeout=60)
    assert f"pid {first.pid} on " in (output / LOCK_NAME).read_text()  # a dead process's lock: taken over
    scripts.prepare_data.main(flags)
    assert "continuing" in capsys.readouterr().out
    assert sorted(path.name for path in output.iterdir()) == [PREPARED_MANIFEST, "train"]
    assert len(list((output / "train").iterdir())) == 12


def test_a_full_disk_while_preparing_leaves_no_temporaries_and_no_dataset_until_complete(tmp_path, scripts,
                                                                                          mixed_source, monkeypatch,
                                                                                          capsys):
    import errno

    from datasets.arrow_writer import ArrowWriter

    output = tmp_path / "out"
    flags = ["--dataset_name", str(mixed_source), "--output_dir", str(output), "--short_side", "8", "--shard_size",
             "16", "--num_proc", "1", "--disable_tqdm", "true"]
    write_batch, calls = ArrowWriter.write_batch, []

    def disk_full_at_the_third_shard(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            self.stream.write(b"half a shard")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return write_batch(self, *args, **kwargs)

    monkeypatch.setattr(ArrowWriter, "write_batch", disk_full_at_the_third_shard)
    with pytest.raises(RunError, match=rf"Writing {output} failed \(No space left on device\). The 2 finished "
                                       "shard\\(s\\) are kept and the half-written files removed"):
        scripts.prepare_data.main(flags)
    assert not [path for path in output.rglob("*") if ".tmp-" in path.name]
    assert sorted(path.name for path in output.iterdir()) == [".preparing"]  # nothing `datasets` would load
    with pytest.raises(datasets.data_files.EmptyDatasetError):
        datasets.load_dataset(str(output), cache_dir=str(tmp_path / "cache"))
    for left in (".preparing/train/data-00002-of-00004.arrow.tmp-99999", ".preparing/progress/x.json.tmp-99999"):
        (output / left).write_bytes(b"what a killed worker left")
    monkeypatch.undo()
    scripts.prepare_data.main(flags)  # room made: the same command
    out = capsys.readouterr().out
    assert "removed 2 half-written file(s)" in out and "2 finished shard(s) (32 images) kept" in out
    assert sorted(path.name for path in output.rglob("*")) == sorted(
        [PREPARED_MANIFEST, "train", "test", *(f"data-0000{index}-of-00004.arrow" for index in range(4)),
         "data-00000-of-00001.arrow"])
    loaded = datasets.load_dataset(str(output), cache_dir=str(tmp_path / "cache"))
    assert (loaded["train"].num_rows, loaded["test"].num_rows) == (50, 12)

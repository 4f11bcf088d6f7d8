"""Fault injection, inputs (issue 11, items 2, 7, 8): bad labels, bad images, bad files and flags.

Every case runs a script as the command line does (`run_script(main, argv)`: in-process, for speed) and checks the
exit code (2: usage, 1: failure), the `error: ...` line naming the file/flag/row, that no traceback reached the
user, and that nothing was written. A few cases run as real processes to show what reaches stderr there.
"""

import contextlib
import io
import json
import os
import re
import subprocess
import sys

import datasets
import numpy as np
import pytest
import torch
from fixtures_runs import ROOT, TINY_MODEL
from PIL import Image

from mae_hf import MAEConfig, MAEForImageClassification, MAEForPreTraining
from mae_hf.cli import UsageError, run_script, strip_debug_flag
from mae_hf.convert import to_vit_mae
from mae_hf.data import DataArguments, load_image_splits
from mae_hf.data.decode import to_8_bit

TINY = ",".join(f"{key}={value}" for key, value in TINY_MODEL.items())
NAMES = ["cat", "dog", "ship"]


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def write_split(path, labels, images=None, names=NAMES, seed=0):
    """A parquet split of 12x12 RGB PNGs (or the given {bytes, path} images) with `labels` (ClassLabel with `names`,
    or plain integers when `names` is None)."""
    rng = np.random.default_rng(seed)
    images = images or [{"bytes": png_bytes(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)), "path": None}
                        for _ in labels]
    label = datasets.ClassLabel(names=names) if names else datasets.Value("int64")
    features = datasets.Features({"img": datasets.Image(), "label": label})
    plain = datasets.Features({"img": datasets.Image(), "label": datasets.Value("int64")})
    dataset = datasets.Dataset.from_dict({"img": images, "label": list(labels)}, features=plain)
    dataset.cast(features).to_parquet(str(path))  # cast: the ClassLabel metadata, without its range check


def make_dataset(folder, train_labels, test_labels=None, **kwargs):
    folder.mkdir(parents=True, exist_ok=True)
    write_split(folder / "train.parquet", train_labels, **kwargs)
    write_split(folder / "test.parquet", test_labels or [i % 3 for i in range(8)], seed=1,
                names=kwargs.get("names", NAMES))
    return str(folder)


def call(main, argv):
    """A script run as the command line does it."""
    return run_script(main, [str(arg) for arg in argv])


def run(main, argv, capsys, code=1, debug=False):
    """(stderr text) of a script run that must fail with `code`; no traceback may reach the user (unless `debug`:
    --debug or MAE_HF_DEBUG=1 asked for one)."""
    with pytest.raises(SystemExit) as exit_info:
        call(main, argv)
    status = exit_info.value.code
    err = capsys.readouterr().err
    if isinstance(status, str):  # sys.exit("error: ...") inside the script: Python prints it, exit status 1
        err, status = f"{err}\n{status}", 1
    assert status == code, err
    assert ("Traceback" in err) == debug, err
    return err


def snapshot(folder) -> dict:
    """{file: (size, mtime)} under `folder`: to show that a failed run changed nothing there."""
    return {os.path.join(root, name): (os.path.getsize(os.path.join(root, name)),
                                       os.path.getmtime(os.path.join(root, name)))
            for root, _, names in os.walk(folder) for name in names}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Saved folders: a tiny pretraining model, a probe (classifier, no decoder) and a transformers ViTMAE."""
    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    config = MAEConfig(**TINY_MODEL)
    pretraining = MAEForPreTraining(config)
    pretraining.save_pretrained(root / "mae")
    MAEForImageClassification(MAEConfig(**TINY_MODEL, num_labels=3, linear_probe=True)).save_pretrained(root / "probe")
    to_vit_mae(pretraining).save_pretrained(root / "vit_mae")
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data"), [i % 3 for i in range(24)])


def probe_args(dataset, output, *extra):
    return ["--dataset_name", dataset, "--output_dir", output, "--config_overrides", TINY, "--knn_k", "2",
            "--probe_epochs", "1", "--disable_tqdm", "true", *extra]


# ---- item 2: labels ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("train_labels, message", [
    ([0, 1, 2, -1] * 6, r"Split 'train', label column 'label': 6 of 24 labels lie outside \[0, 3\) \(the 3 class "
                        r"names.*the first is row 3 \(-1\)\. -1 means 'unlabelled'"),
    ([0, 1, 2, None] * 6, r"Split 'train'.*6 of 24 labels are missing \(None\); the first is row 3"),
    ([0, 1, 2, 3] * 6, r"Split 'train'.*6 of 24 labels lie outside \[0, 3\).*row 3 \(3\)\. Fix those rows, or the "
                       r"class names"),
])
def test_bad_labels_stop_the_probe_before_any_work(tmp_path, scripts, capsys, train_labels, message):
    dataset = make_dataset(tmp_path / "data", train_labels)
    err = run(scripts.linear_probe.main, probe_args(dataset, tmp_path / "out"), capsys)
    assert err.count("error: ") == 1
    assert re.search(message, err), err
    assert not (tmp_path / "out").exists()


def test_finetune_refuses_unlabelled_images(tmp_path, scripts, capsys):
    """Label smoothing used to clamp -1 to class 0 and train on it."""
    dataset = make_dataset(tmp_path / "data", [0, 1, 2, -1] * 6)
    err = run(scripts.finetune.main, ["--random_init", "true", "--dataset_name", dataset, "--output_dir",
                                      tmp_path / "out", "--config_overrides", TINY, "--per_device_train_batch_size", 4,
                                      "--max_steps", 1], capsys)
    assert "-1 means 'unlabelled'" in err and "row 3" in err
    assert not (tmp_path / "out").exists() or not os.listdir(tmp_path / "out")


def test_label_type_and_split_agreement(tmp_path):
    cases = {
        "strings": (["a", "b"] * 6, None, "holds string values, not integer class indices \\(row 0: 'a'\\)"),
        "unseen": ([0, 1] * 6, [0, 1, 2, 2], "Split 'test'.*2 of 4 labels are classes that the training split does "
                                             "not have; the first is row 2"),
        "fractional": ([0.0, 1.0, 1.5] * 4, None, r"4 of 12 labels are not integers; the first is row 2 \(1\.5\)"),
    }
    for name, (train, test, message) in cases.items():
        folder = tmp_path / name
        folder.mkdir()
        features = datasets.Features({"img": datasets.Image(), "label": datasets.Value(
            {"strings": "string", "fractional": "float64"}.get(name, "int64"))})
        images = [Image.new("RGB", (4, 4))] * len(train)
        datasets.Dataset.from_dict({"img": images, "label": train}, features=features).to_parquet(
            str(folder / "train.parquet"))
        datasets.Dataset.from_dict({"img": images[:len(test or train)], "label": test or train},
                                   features=features).to_parquet(str(folder / "test.parquet"))
        with pytest.raises(ValueError, match=message):
            load_image_splits(DataArguments(dataset_name=str(folder)), 8, require_labels=True)
    other = tmp_path / "names"  # a save_to_disk folder keeps each split's features (parquet folders share one)
    make_dataset(other, [0, 1, 2] * 4)
    write_split(other / "truck.parquet", [0, 1, 2], names=["cat", "dog", "truck"])
    splits = {name: datasets.Dataset.from_parquet(str(other / f"{file}.parquet"))
              for name, file in (("train", "train"), ("test", "truck"))}
    datasets.DatasetDict(splits).save_to_disk(str(other / "saved"))
    other = other / "saved"
    with pytest.raises(ValueError, match=r"class names of split 'train' \(\['cat', 'dog', 'ship'\]\) and split "
                                         r"'test' \(\['cat', 'dog', 'truck'\]\) differ"):
        load_image_splits(DataArguments(dataset_name=str(other)), 8, require_labels=True)


def test_head_size_comes_from_the_class_names(tmp_path, scripts, capsys):
    """Labels 0 and 1 only, of three class names: the probe has three outputs, not max label + 1."""
    dataset = make_dataset(tmp_path / "data", [0, 1] * 6, [0, 1, 1, 0])
    call(scripts.linear_probe.main, probe_args(dataset, str(tmp_path / "out"), "--knn", "false"))
    probe = MAEForImageClassification.from_pretrained(tmp_path / "out")
    assert probe.config.id2label == {0: "cat", 1: "dog", 2: "ship"} and probe.classifier.out_features == 3


@pytest.fixture(scope="module")
def partly_labelled_run(tmp_path_factory, scripts):
    """(folder, printed output) of a tiny pretraining run on 20 images: 8 unlabelled (-1 or None), one corrupt
    (row 5), skipped with --skip_bad_images."""
    root = tmp_path_factory.mktemp("partly_labelled")
    rng = np.random.default_rng(0)
    images = [{"bytes": png_bytes(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)), "path": None}
              for _ in range(20)]
    images[5] = {"bytes": b"\x89PNG\r\n\x1a\n broken", "path": None}
    dataset = make_dataset(root / "data", [0, 1, -1, None, 2] * 4, images=images)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        call(scripts.pretrain.main, ["--dataset_name", dataset, "--output_dir", root / "run", "--config_overrides",
                                     TINY, "--per_device_train_batch_size", 4, "--max_steps", 2, "--knn_k", 2,
                                     "--eval_strategy", "no", "--save_strategy", "no", "--disable_tqdm", "true",
                                     "--skip_bad_images", "true"])
    return root / "run", printed.getvalue()


def test_pretraining_treats_minus_one_and_none_as_unlabelled(partly_labelled_run):
    """STL-10's convention: -1 (or None) is an unlabelled image; pretraining uses it, the kNN monitor does not.
    The same run skips a corrupt image (--skip_bad_images) and records it."""
    output, out = partly_labelled_run
    assert out.count("[data] unlabelled images") == 1
    assert "8 of 19 training" in out and "left out of the kNN monitor" in out
    assert "skipped 1 image(s) that cannot be decoded (--skip_bad_images): row 5" in out
    summary = json.loads((output / "pretraining_summary.json").read_text())
    assert summary["eval_knn_accuracy"] is not None and summary["train_samples"] == 19
    assert summary["skipped_images"] == {"train": ["row 5"], "test": []}


def test_pretraining_without_labelled_images_has_no_knn(tmp_path, scripts, capsys):
    dataset = make_dataset(tmp_path / "data", [-1] * 8)
    call(scripts.pretrain.main, ["--dataset_name", dataset, "--output_dir", tmp_path / "run", "--config_overrides",
                                 TINY, "--per_device_train_batch_size", 4, "--max_steps", 1, "--eval_strategy", "no",
                                 "--save_strategy", "no", "--disable_tqdm", "true"])
    out = capsys.readouterr().out
    assert "8 of 8 training" in out and "with no labelled images in a split, there is no kNN monitor" in out
    assert json.loads((tmp_path / "run" / "pretraining_summary.json").read_text())["eval_knn_accuracy"] is None


# ---- item 7: images ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("content, problem", [
    (b"not an image at all", "not an image in a format PIL reads"),
    (b"", "the image is an empty \\(0-byte\\) file"),
])
def test_bad_image_names_split_and_row(tmp_path, scripts, capsys, content, problem):
    rng = np.random.default_rng(0)
    images = [{"bytes": png_bytes(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)), "path": None}
              for _ in range(12)]
    images[7] = images[9] = {"bytes": content, "path": None}
    dataset = make_dataset(tmp_path / "data", [i % 3 for i in range(12)], images=images)
    err = run(scripts.linear_probe.main, probe_args(dataset, tmp_path / "out"), capsys)
    assert re.search(rf"Split 'train': 2 of 12 images cannot be decoded; the first is row 7: {problem}.*"
                     r"--skip_bad_images true", err), err
    assert not (tmp_path / "out").exists()

    call(scripts.linear_probe.main, probe_args(dataset, str(tmp_path / "out"), "--skip_bad_images", "true"))
    assert "skipped 2 image(s)" in capsys.readouterr().out
    result = json.loads((tmp_path / "out" / "knn_results.json").read_text())
    assert result["train_samples"] == 10 and result["skipped_images"] == {"train": ["row 7", "row 9"], "test": []}


def test_bad_file_in_an_imagefolder_is_named(tmp_path):
    for split in ("train", "test"):
        for index in range(6):
            folder = tmp_path / "tree" / split / NAMES[index % 3]
            folder.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (8, 8), (index, 0, 0)).save(folder / f"{index}.png")
    bad = tmp_path / "tree" / "train" / "dog" / "truncated.png"
    bad.write_bytes(png_bytes(np.zeros((8, 8, 3), dtype=np.uint8))[:40])
    with pytest.raises(ValueError, match=rf"Split 'train': 1 of 7 images cannot be decoded; the first is row \d+ "
                                         rf"\({bad}\)"):
        load_image_splits(DataArguments(dataset_name=str(tmp_path / "tree")), 8)


def test_sixteen_bit_png_is_scaled_not_clipped(tmp_path):
    """A 16-bit greyscale PNG (PIL mode I;16) has samples up to 65535: scaled to 0..255, not clipped to white."""
    ramp = np.linspace(0, 65535, 64).reshape(8, 8).astype(np.uint16)
    buffer = io.BytesIO()
    Image.fromarray(ramp).save(buffer, format="PNG")
    assert Image.open(io.BytesIO(buffer.getvalue())).mode == "I;16"
    make_dataset(tmp_path / "data", [0, 1, 2] * 2, images=[{"bytes": buffer.getvalue(), "path": None}] * 6)
    train, _ = load_image_splits(DataArguments(dataset_name=str(tmp_path / "data")), image_size=8)
    expected = torch.from_numpy(np.rint(ramp / 257).astype(np.uint8))
    assert torch.equal(train.images[0, 0], expected) and torch.equal(train.images[0, 2], expected)
    assert train.images.float().mean() < 140  # clipping made almost every pixel 255
    for values, scale in ((ramp.astype(">u2"), 1 / 257), (ramp.astype(np.int32), 1 / 257),
                          ((ramp / 65535).astype(np.float32), 255.0)):
        image = Image.fromarray(values)  # modes I;16B (big-endian), I (32-bit integers), F (floats in [0, 1])
        expected = np.rint(values.astype(np.float64) * scale).astype(np.uint8)
        assert np.array_equal(np.asarray(to_8_bit(image).convert("L")), expected), image.mode


# ---- item 8: bad files and flags -----------------------------------------------------------------------------------

def broken_model(models, tmp_path, change) -> str:
    """A copy of the tiny pretraining folder, broken by `change(folder)`."""
    folder = tmp_path / "model"
    folder.mkdir()
    for name in os.listdir(models / "mae"):
        (folder / name).write_bytes((models / "mae" / name).read_bytes())
    change(folder)
    return str(folder)


@pytest.mark.parametrize("change, message", [
    (lambda f: (f / "model.safetensors").write_bytes((f / "model.safetensors").read_bytes()[:300]),
     "model.safetensors is truncated"),
    (lambda f: (f / "model.safetensors").write_bytes(b""), "model.safetensors is empty"),
    (lambda f: (f / "model.safetensors").unlink(), "no model weights (model.safetensors) in this folder"),
    (lambda f: (f / "config.json").write_text('{"model_type": "mae_hf", '), "config.json is not valid JSON"),
    (lambda f: (f / "config.json").write_text("[1, 2]"), "config.json holds a JSON list, not an object"),
    (lambda f: (f / "config.json").unlink(), "no config.json in this folder"),
    (lambda f: (f / "config.json").write_text((f / "config.json").read_text().replace('"hidden_size": 16',
                                                                                      '"hidden_size": 32')),
     "saved weight(s) do not fit the model config"),
])
def test_broken_model_folder(tmp_path, scripts, capsys, models, change, message):
    folder = broken_model(models, tmp_path, change)
    before = snapshot(folder)
    err = run(scripts.linear_probe.main, ["--model_name_or_path", folder, "--output_dir", tmp_path / "out",
                                          "--dataset_name", "unused"], capsys)
    assert message in err and folder in err
    assert snapshot(folder) == before and not (tmp_path / "out").exists()


@pytest.mark.parametrize("content, message", [
    ("a: [1,\n", "config file {} is not valid YAML"),
    ("- 1\n- 2\n", "config file {} must hold a mapping of options"),
    ("", None),  # an empty file: no options, the flags alone decide (then --output_dir is missing)
    ("learning_rate: ten\n", "config file {}: learning_rate: 'ten' is not a valid float value"),
    ("bf16: maybe\n", "config file {}: bf16: 'maybe' is not a valid true/false value"),
    ("output_dir: out\nlr_scheduler_type: wobbly\n",
     "config file {}: lr_scheduler_type: wobbly is not a valid SchedulerType"),
])
def test_bad_config_file_is_a_usage_error(tmp_path, scripts, capsys, content, message):
    config = tmp_path / "config.yaml"
    config.write_text(content)
    err = run(scripts.pretrain.main, [config], capsys, code=2)
    assert (message.format(config) if message else "--output_dir is required") in err
    (tmp_path / "config.json").write_text('{"output_dir": ')
    assert "config.json is not valid JSON" in run(scripts.pretrain.main, [tmp_path / "config.json"], capsys, code=2)


@pytest.mark.parametrize("script, flag", [("pretrain", "--evaluation_strategy"), ("finetune", "--overwrite_output_dir"),
                                          ("pretrain", "--push_to_hub_model_id=me/mae"), ("finetune", "--no_cuda"),
                                          ("linear_probe", "--logging_dir")])
def test_transformers_4_flags_get_their_5_names(tmp_path, scripts, capsys, script, flag):
    """A transformers 4 flag is named with what transformers 5 calls it (or that it is gone), as docs/migrating.md
    lists it, instead of "not used by the HfArgumentParser"."""
    from mae_hf.cli import RENAMED_FLAGS

    name = flag.split("=")[0]
    err = run(getattr(scripts, script).main, ["--output_dir", tmp_path / "out", flag], capsys, code=2)
    assert f"{name} is a transformers 4 flag: {RENAMED_FLAGS[name]}" in err and not (tmp_path / "out").exists()
    migrating = (ROOT / "docs" / "migrating.md").read_text()
    for old, instead in RENAMED_FLAGS.items():  # the guide lists each with its new name
        assert f"`{old}`" in migrating, old
        new_name = re.search(r"calls it (--\w+)", instead)
        assert new_name is None or f"`{new_name.group(1)}`" in migrating, instead


@pytest.mark.parametrize("flags, message", [
    (["--per_device_train_batch_size", 0], "--per_device_train_batch_size must be at least 1, got 0"),
    (["--max_steps", 0], "--max_steps must be a positive number of steps"),
    (["--learning_rate", -0.1], "--learning_rate must be a finite number >= 0, got -0.1"),
    (["--num_train_epochs", 0], "--num_train_epochs must be positive"),
    (["--knn_k", 0], "--knn_k must be at least 1, got 0"),  # was: a kNN accuracy from no neighbour
    (["--num_reconstructions", 0], "--num_reconstructions must be at least 1, got 0"),  # was: error mid-run
])
def test_bad_numbers_are_usage_errors(tmp_path, scripts, capsys, data, flags, message):
    err = run(scripts.pretrain.main, ["--output_dir", tmp_path / "out", "--dataset_name", data, *flags], capsys,
              code=2)
    assert message in err and not (tmp_path / "out").exists()


@pytest.mark.parametrize("flags, message", [
    (["--layer_decay", -1], "--layer_decay must be > 0"),  # was: layers trained with negative learning rates
    (["--label_smoothing_factor", 2], "--label_smoothing_factor must lie in [0, 1), got 2.0"),
])
def test_bad_finetune_numbers_are_usage_errors(tmp_path, scripts, capsys, data, flags, message):
    err = run(scripts.finetune.main, ["--output_dir", tmp_path / "out", "--dataset_name", data, "--random_init",
                                      "true", *flags], capsys, code=2)
    assert message in err and not (tmp_path / "out").exists()


@pytest.mark.parametrize("bad, message", [
    (["--mask_ratio", 1.5], "invalid mask_ratio=1.5: must lie in [0, 1)"),
    (["--config_overrides", "hidden_size=100"], "invalid hidden_size=100: must be divisible by num_attention_heads"),
    (["--config_overrides", "hiden_size=64"], "--config_overrides: unknown field(s) ['hiden_size']"),
    (["--config_overrides", "hidden_size"], "--config_overrides: config override 'hidden_size' is not of the form"),
    (["--mask_ratio", 0.5, "--config_overrides", "mask_ratio=0.6"], "--mask_ratio 0.5 and --config_overrides "
                                                                   "mask_ratio=0.6 disagree"),
], ids=["mask_ratio", "invalid_config", "unknown_field", "not_key_value", "disagree"])
@pytest.mark.parametrize("script", ["pretrain", "finetune", "linear_probe", "knn", "show_augmentations"])
def test_config_validated_flags_are_usage_errors_in_every_script(tmp_path, scripts, capsys, data, script, bad,
                                                                 message):
    """The model config the flags make is checked after parsing: a bad value is still a usage error (exit 2)."""
    argv = ["--output_dir", tmp_path / "out", "--dataset_name", data, *bad]
    main = scripts.linear_probe.main if script == "knn" else getattr(scripts, script).main
    kwargs = {"linear_probe": False} if script == "knn" else {}
    if script == "finetune":
        argv += ["--random_init", "true"]
    with pytest.raises(SystemExit) as exit_info:
        run_script(main, [str(arg) for arg in argv], **kwargs)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err, err
    assert err.count("error: ") == 1 and message in err, err
    assert not (tmp_path / "out").exists()


def test_reproduce_passes_a_steps_usage_error_on(tmp_path, scripts, capsys, data):
    for flags in ("--mask_ratio 1.5", "--no_such_flag 1"):
        with pytest.raises(SystemExit) as exit_info:
            run_script(scripts.reproduce.main, ["--output_dir", str(tmp_path / "run"), "--dataset_name", data,
                                                "--cpu_small", "--pretrain_args", flags])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and "error: step pretrain failed" in err, err


def test_probe_flags_and_output_dir(tmp_path, scripts, capsys, data):
    assert "--probe_batch_size must be at least 1" in run(
        scripts.linear_probe.main, probe_args(data, tmp_path / "out", "--probe_batch_size", 0), capsys, code=2)
    assert "--device 'gpu0' is not a device" in run(
        scripts.linear_probe.main, probe_args(data, tmp_path / "out", "--device", "gpu0"), capsys, code=2)
    if not torch.cuda.is_available():  # it used to end in torch's AssertionError traceback
        assert "--device cuda: this machine has no CUDA GPU" in run(
            scripts.linear_probe.main, probe_args(data, tmp_path / "out", "--device", "cuda"), capsys, code=2)
    err = run(scripts.linear_probe.main, probe_args(data, tmp_path / "out", "--label_column_name", "img"), capsys)
    line = err.strip().splitlines()[-1]
    assert "the label column 'img' holds struct<bytes: binary, path: string> values" in line and len(line) < 400
    (tmp_path / "file").write_text("not a folder")
    err = run(scripts.linear_probe.main, probe_args(data, tmp_path / "file"), capsys, code=2)
    assert "--output_dir" in err and "is a file, not a folder" in err
    assert (tmp_path / "file").read_text() == "not a folder"


@pytest.mark.parametrize("make, message", [
    (lambda d: (d / "train.parquet").write_bytes(b"") or d / "train.parquet", "parquet file(s) are empty (0 bytes)"),
    (lambda d: (d / "train.parquet").write_bytes(b"") or d, "parquet file(s) are empty (0 bytes)"),
    (lambda d: d, "could not read this folder as a dataset"),
])
def test_empty_dataset_files(tmp_path, scripts, capsys, make, message):
    folder = tmp_path / "dataset"
    folder.mkdir()
    err = run(scripts.linear_probe.main, probe_args(make(folder), tmp_path / "out"), capsys)
    assert message in err and str(folder) in err


def test_config_name_folder_without_config_is_refused(tmp_path, scripts, capsys, data):
    """It used to train the default model silently."""
    (tmp_path / "empty").mkdir()
    err = run(scripts.pretrain.main, ["--config_name", tmp_path / "empty", "--output_dir", tmp_path / "out",
                                      "--dataset_name", data, "--per_device_train_batch_size", 4], capsys)
    assert f"--config_name {tmp_path / 'empty'}: no config.json in this folder" in err
    assert not (tmp_path / "out").exists()


def hub_snapshot(hub, name, commit, train_labels):
    """A dataset as huggingface_hub caches what it downloaded from the Hub: snapshots/<commit>/, refs/main."""
    repository = hub / f"datasets--{name.replace('/', '--')}"
    snapshot = repository / "snapshots" / commit / "plain_text"
    snapshot.mkdir(parents=True)
    write_split(snapshot / "train-00000-of-00001.parquet", train_labels)
    write_split(snapshot / "test-00000-of-00001.parquet", [0, 1, 2, 0], seed=1)
    (repository / "refs").mkdir(exist_ok=True)
    (repository / "refs" / "main").write_text(commit)


def test_a_hub_id_reads_the_hub_s_data_never_a_cache_a_local_folder_left(tmp_path, scripts, monkeypatch, capsys):
    import time
    from types import SimpleNamespace

    import huggingface_hub

    from mae_hf.data.sources import load_raw_dataset

    cache = str(tmp_path / "datasets_cache")  # where a local folder named cifar10 leaves datasets' cache "cifar10"
    local = make_dataset(tmp_path / "elsewhere" / "cifar10", [i % 3 for i in range(30)])
    assert len(load_raw_dataset(DataArguments(dataset_name=local, cache_dir=cache))["train"]) == 30
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    start = time.perf_counter()
    with pytest.raises(ValueError, match=r"--dataset_name cifar10: could not load it from the Hugging Face Hub "
                                         r"\(HF_HUB_OFFLINE=1 is set\), and no copy downloaded from the Hub is cached"):
        load_raw_dataset(DataArguments(dataset_name="cifar10", cache_dir=cache))
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)

    def no_network(*args, **kwargs):
        raise ConnectionError("[Errno -2] Name or service not known")

    monkeypatch.setattr(huggingface_hub.HfApi, "dataset_info", no_network)
    with pytest.raises(ValueError, match=r"\(the Hub cannot be reached: ConnectionError: \[Errno -2\] Name or service"):
        load_raw_dataset(DataArguments(dataset_name="cifar10", cache_dir=cache))
    assert time.perf_counter() - start < 10  # said at once, not after datasets' 30 s of retries
    # Downloaded from the Hub earlier: read offline from that snapshot, its commit recorded with the run.
    hub_snapshot(tmp_path / "hub", "cifar10", "a" * 40, [i % 3 for i in range(12)])
    args = DataArguments(dataset_name="cifar10", cache_dir=cache)
    assert {split: len(rows) for split, rows in load_raw_dataset(args).items()} == {"train": 12, "test": 4}
    assert args.dataset_revision == "a" * 40
    assert "the Hub cannot be reached" in capsys.readouterr().err
    flags = ["--output_dir", tmp_path / "run", "--dataset_name", "cifar10", "--cache_dir", cache, "--config_overrides",
             TINY, "--per_device_train_batch_size", 4, "--num_train_epochs", 1, "--knn_eval", "false",
             "--disable_tqdm", "true"]
    call(scripts.pretrain.main, flags)
    settings = json.loads((tmp_path / "run" / "run_settings.json").read_text())
    assert settings["data"]["dataset_revision"] == "a" * 40
    hub_snapshot(tmp_path / "hub", "cifar10", "b" * 40, [i % 3 for i in range(16)])  # the Hub's data changed
    err = run(scripts.pretrain.main, [*flags, "--resume_from_checkpoint", "last"], capsys)
    assert f"data.dataset_revision: {'a' * 40!r} in the checkpoint, {'b' * 40!r} now" in err
    # Online, the Hub names the commit, which datasets is asked for.
    asked = {}
    monkeypatch.setattr(huggingface_hub.HfApi, "dataset_info", lambda *args, **kwargs: SimpleNamespace(sha="c" * 40))
    monkeypatch.setattr(datasets, "load_dataset", lambda *args, **kwargs: asked.update(kwargs) or
                        datasets.DatasetDict({"train": datasets.Dataset.from_dict({"x": [1]})}))
    args = DataArguments(dataset_name="someone/images")
    load_raw_dataset(args)
    assert asked["revision"] == args.dataset_revision == "c" * 40


def test_hub_id_while_offline(tmp_path, scripts, capsys, data, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    err = run(scripts.linear_probe.main, probe_args(data, tmp_path / "out", "--model_name_or_path",
                                                    "someone/mae-model"), capsys)
    assert "--model_name_or_path someone/mae-model: no such local folder" in err and "HF_HUB_OFFLINE=1" in err
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    err = run(scripts.linear_probe.main, probe_args("someone/images", tmp_path / "out"), capsys)
    assert "--dataset_name someone/images: could not load it from the Hugging Face Hub" in err
    assert not (tmp_path / "out").exists()


def test_torn_result_file(tmp_path, scripts, capsys):
    (tmp_path / "runs").mkdir()
    torn = tmp_path / "runs" / "knn_results.json"
    torn.write_text('{"protocol": "knn", "eval_accura')
    err = run(scripts.compare.main, [tmp_path / "runs", "--output", tmp_path / "table.md"], capsys)
    assert f"{torn} is not valid JSON" in err and not (tmp_path / "table.md").exists()
    torn.write_text("")
    assert f"{torn} is empty" in run(scripts.compare.main, [torn], capsys)


def test_torn_result_file_given_to_publish(tmp_path, scripts, capsys, partly_labelled_run):
    torn = tmp_path / "random_init" / "linear_probe_results.json"
    torn.parent.mkdir()
    torn.write_text('{"protocol": "linear_probe", "eval_accuracy": 0.')
    err = run(scripts.publish.main, [partly_labelled_run[0], "--results", torn.parent, "--output_dir",
                                     tmp_path / "hub"], capsys)
    assert f"{torn} is not valid JSON" in err and not (tmp_path / "hub").exists()


def test_publish_names_broken_weights(tmp_path, scripts, capsys, pretrained_run):
    """A truncated model.safetensors in the run to publish: one error naming it (was a SafetensorError traceback)."""
    import shutil

    folder = tmp_path / "run"
    shutil.copytree(pretrained_run[0], folder, ignore=shutil.ignore_patterns("checkpoint-*"))
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    err = run(scripts.publish.main, [folder, "--output_dir", tmp_path / "hub"], capsys)
    assert f"error: {weights} is truncated" in err and not (tmp_path / "hub").exists()


def test_visualize_refuses_what_cannot_reconstruct(tmp_path, scripts, capsys, models, data):
    for name, message in (("probe", "has no decoder (MAEForImageClassification"),
                          ("vit_mae", "holds a transformers ViTMAE model; convert it to mae_hf first: python "
                                      "scripts/convert.py")):
        before = snapshot(models / name)
        err = run(scripts.visualize.main, [models / name, "--dataset_name", data], capsys)
        assert message in err and snapshot(models / name) == before
    assert "MODEL_DIR (a pretraining output folder) is required" in run(scripts.visualize.main, [], capsys, code=2)
    assert "--num_images must be at least 1" in run(
        scripts.visualize.main, [models / "mae", "--dataset_name", data, "--num_images", 0], capsys, code=2)
    weights = models / "mae" / "model.safetensors"
    before = snapshot(models / "mae")
    assert "give a path ending in .png" in run(
        scripts.visualize.main, [models / "mae", "--dataset_name", data, "--output", weights], capsys, code=2)
    assert snapshot(models / "mae") == before


# ---- the command line itself: no traceback, unless asked for -------------------------------------------------------

DRIVER = """
import runpy, sys
sys.path.insert(0, "scripts")
for line in sys.stdin.read().splitlines():
    script, *argv = line.split("\\t")
    sys.argv = [script, *argv]
    try:
        runpy.run_path(script, run_name="__main__")
        status = 0
    except SystemExit as exit:
        status = exit.code
        if isinstance(status, str):  # what the interpreter does with sys.exit("message")
            print(status, file=sys.stderr)
            status = 1
    print(f"== {script} exit {status}", file=sys.stderr, flush=True)
"""


def test_every_script_fails_with_one_error_paragraph_in_a_real_process(tmp_path, models, data):
    """Each script run as `__main__` (through its `run_script` guard), in one real process for speed: the exit code
    and the `error:` line reach stderr, a traceback never does."""
    (tmp_path / "bad.yaml").write_text("output_dir: [\n")
    (tmp_path / "file").write_text("")
    (tmp_path / "torn_results.json").write_text('{"protocol": "kn')
    missing = tmp_path / "missing"
    cases = {
        "scripts/pretrain.py": ([tmp_path / "bad.yaml"], 2, "is not valid YAML"),
        "scripts/finetune.py": (["--random_init", "true", "--output_dir", tmp_path / "ft", "--dataset_name", missing],
                                1, "no such file or folder"),
        "scripts/linear_probe.py": (probe_args(data, tmp_path / "p", "--model_name_or_path", missing), 1,
                                    "--model_name_or_path"),
        "scripts/knn.py": (["--output_dir", tmp_path / "file", "--dataset_name", data], 2, "is a file, not a folder"),
        "scripts/visualize.py": ([models / "probe", "--dataset_name", data], 1, "has no decoder"),
        "scripts/compare.py": ([tmp_path / "torn_results.json"], 1, "is not valid JSON"),
        "scripts/publish.py": ([missing, "--output_dir", tmp_path / "hub"], 1, str(missing)),
        "scripts/convert.py": ([missing, tmp_path / "converted"], 1, "config.json"),
        "scripts/benchmark.py": (["--batch_size", 0], 2, "--batch_size"),
    }
    lines = "\n".join("\t".join(map(str, [script, *argv])) for script, (argv, _, _) in cases.items())
    environment = {key: value for key, value in os.environ.items() if key != "MAE_HF_DEBUG"}
    result = subprocess.run([sys.executable, "-c", DRIVER], input=lines, capture_output=True, text=True, cwd=ROOT,
                            env=environment, timeout=300)
    assert "Traceback" not in result.stderr, result.stderr
    outputs = {script: text for text, script in re.findall(r"(.*?)== (\S+) exit \S+\n", result.stderr, flags=re.S)}
    for script, (argv, code, message) in cases.items():
        assert f"== {script} exit {code}\n" in result.stderr, result.stderr
        errors = [line for line in outputs[script].splitlines() if line.startswith(("error: ", f"{script[8:]}: error"))]
        assert len(errors) == 1 and message in errors[0], (script, outputs[script])
    assert not any((tmp_path / name).exists() for name in ("ft", "p", "hub", "converted"))


def test_debug_shows_the_traceback(scripts, capsys, models, data, monkeypatch):
    argv = [models / "probe", "--dataset_name", data]
    assert "has no decoder" in run(scripts.visualize.main, argv, capsys)
    assert "has no decoder" in run(scripts.visualize.main, [*argv, "--debug"], capsys, debug=True)
    monkeypatch.setenv("MAE_HF_DEBUG", "1")
    assert "has no decoder" in run(scripts.visualize.main, argv, capsys, debug=True)
    missing = os.path.join(data, "missing")  # an error the script reports itself (sys.exit("error: ..."))
    assert "no such file or folder" in run(scripts.compare.main, [missing], capsys, debug=True)


def test_debug_flag_is_ours_unless_it_has_a_trainer_value():
    assert strip_debug_flag(["--debug", "--output_dir", "x"]) == (["--output_dir", "x"], True)
    trainer_option = ["--debug", "underflow_overflow", "--output_dir", "x"]  # TrainingArguments' own --debug
    assert strip_debug_flag(trainer_option) == (trainer_option, False)


def test_a_safetensors_error_anywhere_is_one_line(tmp_path, capsys):
    """Reading a broken weights file or writing one to a full disk fails with safetensors' own error type (not an
    OSError): still one `error:` line, exit code 1, wherever it comes from (e.g. fine-tuning's ema/ save)."""
    from safetensors.torch import save_file

    def main(argv):
        save_file({"x": torch.zeros(1)}, str(tmp_path / "missing" / "model.safetensors"))

    with pytest.raises(SystemExit) as exit_:
        run_script(main, [])
    err = capsys.readouterr().err
    assert exit_.value.code == 1 and err.startswith("error: ") and err.count("\n") == 1, err


def test_ctrl_c_outside_a_training_run_is_one_line(capsys):
    def interrupted_main(argv):  # a probe or kNN extracting features when Ctrl-C arrives
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as exit_:
        run_script(interrupted_main, [])
    assert exit_.value.code == 130
    err = capsys.readouterr().err
    assert err == "error: interrupted (Ctrl-C): the script stopped before it finished.\n"


def test_data_on_the_gpu_is_not_given_to_worker_processes(tmp_path, monkeypatch):
    from mae_hf.data.memory import InMemoryImages
    from mae_hf.data.streaming import StreamedImages
    from mae_hf.training_args import PretrainingArguments

    in_memory = InMemoryImages(torch.zeros(1, 3, 2, 2, dtype=torch.uint8), torch.full((1, 2), 2))
    workers = PretrainingArguments(output_dir=str(tmp_path), dataloader_num_workers=2)
    no_workers = PretrainingArguments(output_dir=str(tmp_path), data_on_device="true")
    monkeypatch.setattr(PretrainingArguments, "device", property(lambda self: torch.device("cuda")))
    assert not workers.place_data_on_device(in_memory)  # auto: the workers gather on the host
    workers.data_on_device = "true"
    with pytest.raises(UsageError, match="--data_on_device true needs --dataloader_num_workers 0"):
        workers.place_data_on_device(in_memory)
    assert no_workers.place_data_on_device(in_memory)
    streamed = StreamedImages(reader=[], sizes=[], canvas=(3, 2, 2))
    with pytest.raises(UsageError, match="--data_on_device true needs the images in memory"):
        no_workers.place_data_on_device(streamed)


def test_a_parquet_split_without_rows_is_named(tmp_path, capsys):
    folder = tmp_path / "data"
    make_dataset(folder, [0, 1, 2] * 4)
    write_split(folder / "test.parquet", [])  # a split written empty
    with pytest.raises(ValueError, match=r"test.parquet holds no rows: its split would be empty"):
        load_image_splits(DataArguments(dataset_name=str(folder)), 8)
    with pytest.raises(ValueError, match=r"holds no rows"):
        load_image_splits(DataArguments(dataset_name=str(folder / "test.parquet")), 8)


def test_pretraining_goes_on_when_the_evaluation_split_has_classes_training_lacks(tmp_path, scripts, capsys):
    """Only the kNN monitor uses labels in pretraining: those images are left out of it, with a warning."""
    folder = make_dataset(tmp_path / "data", [0, 1] * 12, [0, 1, 2, 2, 0, 1, 2, 2])
    output = tmp_path / "run"
    call(scripts.pretrain.main, ["--dataset_name", folder, "--output_dir", output, "--config_overrides", TINY,
                                 "--per_device_train_batch_size", "8", "--num_train_epochs", "1", "--knn_k", "2",
                                 "--disable_tqdm", "true"])
    captured = capsys.readouterr()
    assert "the evaluation split (test) has 1 class(es) that the training split (train) lacks: ['ship']" in \
        captured.err
    summary = json.loads((output / "pretraining_summary.json").read_text())
    assert summary["eval_samples"] == 8 and summary["eval_knn_accuracy"] is not None
    with pytest.raises(ValueError, match="are classes that the training split does not have"):  # a classifier
        load_image_splits(DataArguments(dataset_name=folder), 8, require_labels=True)

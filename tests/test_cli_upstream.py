"""transformers' documented example commands (examples/pytorch/image-pretraining/run_mae.py and
image-classification/run_image_classification.py) with our script names, on tiny local data and a few steps:
accepted, and with the upstream meaning (issue 12). One test per item of the issue."""

import contextlib
import io
import json
import sys
import types

import datasets
import pytest
import torch
from fixtures_runs import TINY_MODEL, tiny_split

from mae_hf import MAEConfig, MAEForImageClassification, MAEForPreTraining
from mae_hf.cli import UsageError, parse_args
from mae_hf.data import DataArguments, load_image_splits
from mae_hf.loading import ModelArguments, load_pretrained
from mae_hf.results import encoder_fingerprint
from mae_hf.training import ThroughputCallback
from mae_hf.training_args import PretrainingArguments

# examples/pytorch/image-pretraining/README.md (run_mae.py), "own data" form: --train_dir instead of --dataset_name
RUN_MAE = ["--model_type", "mae_hf", "--remove_unused_columns", "False", "--label_names", "pixel_values",
           "--mask_ratio", "0.6", "--norm_pix_loss", "--do_train", "--do_eval", "--base_learning_rate", "1.5e-4",
           "--lr_scheduler_type", "cosine", "--weight_decay", "0.05", "--num_train_epochs", "800",
           "--warmup_ratio", "0.05", "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "8",
           "--logging_strategy", "steps", "--logging_steps", "1", "--eval_strategy", "epoch", "--save_strategy",
           "epoch", "--load_best_model_at_end", "True", "--save_total_limit", "3", "--seed", "1337"]
# examples/pytorch/image-classification/README.md (run_image_classification.py), "own data" form
RUN_IMAGE_CLASSIFICATION = [
    "--remove_unused_columns", "False", "--label_column_name", "label", "--do_train", "--do_eval", "--learning_rate",
    "2e-5", "--num_train_epochs", "5", "--per_device_train_batch_size", "16", "--per_device_eval_batch_size", "8",
    "--logging_strategy", "steps", "--logging_steps", "1", "--eval_strategy", "epoch", "--save_strategy", "epoch",
    "--load_best_model_at_end", "True", "--save_total_limit", "3", "--seed", "1337"]


def read(path):
    return json.loads(path.read_text())


def run(function, argv) -> str:
    """Run a script's main, returning what it printed (stdout and stderr)."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
        function(argv)
    return printed.getvalue()


@pytest.fixture(scope="module")
def image_folders(tmp_path_factory):
    """train/<class>/*.png (48 images) and val/<class>/*.png (16 images): the layout --train_dir expects."""
    root = tmp_path_factory.mktemp("image_folders")
    for split, count, seed in (("train", 48, 0), ("val", 16, 1)):
        dataset = tiny_split(count, seed)
        for index, row in enumerate(dataset):
            folder = root / split / dataset.features["label"].names[row["label"]]
            folder.mkdir(parents=True, exist_ok=True)
            row["img"].convert("RGB").save(folder / f"{index}.png")
    return root


@pytest.fixture(scope="module")
def processor_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("processor")
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "ViTImageProcessor", "size": {"height": 8, "width": 8},
        "image_mean": [0.4, 0.4, 0.4], "image_std": [0.2, 0.2, 0.2]}))
    return folder


@pytest.fixture(scope="module")
def mae_run(tmp_path_factory, scripts, image_folders, processor_folder, tiny_overrides):
    """run_mae.py's documented command on an image folder, a quarter held out, 6 steps."""
    folder = tmp_path_factory.mktemp("run_mae") / "out"
    printed = run(scripts.pretrain.main, [
        *RUN_MAE, "--train_dir", str(image_folders / "train"), "--train_val_split", "0.25", "--output_dir",
        str(folder), "--config_overrides", tiny_overrides, "--image_processor_name", str(processor_folder),
        "--trust_remote_code", "true", "--token", "hf_unused", "--model_revision", "main", "--max_steps", "6",
        "--disable_tqdm", "true"])
    return folder, printed


@pytest.fixture(scope="module")
def other_classifier(tmp_path_factory):
    """A classifier checkpoint with 5 labels (the data has 3)."""
    folder = tmp_path_factory.mktemp("classifier5")
    torch.manual_seed(0)
    MAEForImageClassification(MAEConfig(**TINY_MODEL, num_labels=5)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def classification_run(tmp_path_factory, scripts, image_folders, other_classifier):
    """run_image_classification.py's documented command from a 5-label classifier, --ignore_mismatched_sizes."""
    folder = tmp_path_factory.mktemp("run_image_classification") / "out"
    printed = run(scripts.finetune.main, [
        *RUN_IMAGE_CLASSIFICATION, "--train_dir", str(image_folders / "train"), "--validation_dir",
        str(image_folders / "val"), "--model_name_or_path", str(other_classifier), "--ignore_mismatched_sizes",
        "--output_dir", str(folder), "--max_steps", "3", "--lr_scheduler_type", "constant", "--warmup_steps", "0",
        "--disable_tqdm", "true"])
    return folder, printed


def test_1_upstream_flags_keep_their_meaning(mae_run, classification_run, other_classifier, scripts, image_folders,
                                             tmp_path, capsys):
    folder, printed = mae_run
    config = read(folder / "config.json")
    assert (config["mask_ratio"], config["norm_pix_loss"]) == (0.6, True)  # --mask_ratio, --norm_pix_loss
    assert config["image_mean"] == [0.4, 0.4, 0.4] and config["image_std"] == [0.2, 0.2, 0.2]  # the processor's
    summary = read(folder / "pretraining_summary.json")
    assert (summary["mask_ratio"], summary["norm_pix_loss"]) == (0.6, True)
    assert summary["data"]["train_dir"] == str(image_folders / "train") and summary["data"]["train_val_split"] == 0.25
    assert (summary["train_samples"], summary["eval_samples"]) == (36, 12)  # --train_val_split: a fraction
    assert "25% of train held out" in summary["eval_split"]
    assert summary["learning_rate"] == pytest.approx(1.5e-4 * 8 / 256)  # --base_learning_rate x batch / 256
    assert summary["warmup_steps"] == 0.05  # --warmup_ratio
    assert "eval_loss" in read(folder / "eval_results.json")

    folder, printed = classification_run
    result = read(folder / "finetune_results.json")
    assert result["eval_split"] == "validation" and result["eval_samples"] == 16  # --validation_dir
    assert result["train_samples"] == 48 and result["learning_rate"] == 2e-5
    # --ignore_mismatched_sizes: the 5-label head is replaced by a 3-label one; the encoder is the checkpoint's
    assert read(folder / "config.json")["id2label"] == {"0": "cat", "1": "dog", "2": "ship"}
    assert result["encoder_fingerprint"] == encoder_fingerprint(MAEForImageClassification.from_pretrained(
        other_classifier).mae)
    without = ["--train_dir", str(image_folders / "train"), "--model_name_or_path", str(other_classifier),
               "--output_dir", str(tmp_path / "refused"), "--per_device_train_batch_size", "16"]
    with pytest.raises(ValueError, match="5 labels; this data has 3. Pass --ignore_mismatched_sizes true"):
        scripts.finetune.main(without)
    assert not (tmp_path / "refused").exists()

    for script in (scripts.pretrain, scripts.finetune, scripts.linear_probe):  # every new flag's help renders
        with pytest.raises(SystemExit) as exit_:
            run(script.main, ["--help"])
        assert exit_.value.code == 0
    with pytest.raises(SystemExit):  # another architecture: refused with the conversion hint
        parse_args((ModelArguments,), ["--model_type", "vit_mae"])
    assert "python scripts/convert.py" in capsys.readouterr().err


def test_2_split_and_sample_flags_mean_what_upstream_means(parquet_folder, scripts, tiny_overrides, tmp_path, capsys):
    for flags, message in ((["--validation_split_percentage", "0.15"], "for a fraction use --train_val_split 0.15"),
                           (["--train_val_split", "0.2", "--validation_split_percentage", "5"], "disagree"),
                           (["--train_val_split", "15"], "For 15 % use --train_val_split 0.15")):
        with pytest.raises(SystemExit):
            parse_args((DataArguments,), flags)
        assert message in capsys.readouterr().err
    assert parse_args((DataArguments,), ["--train_val_split", "0.15"])[0].validation_split_percentage == 15

    import datasets

    rows = datasets.load_dataset(str(parquet_folder))["train"].add_column("row", list(range(48)))
    drawn = rows.shuffle(seed=42).select(range(5))["row"]  # upstream: shuffle with the seed, then take N
    whole, _ = load_image_splits(DataArguments(dataset_name=str(parquet_folder)), image_size=8)
    subset, small = load_image_splits(DataArguments(dataset_name=str(parquet_folder), max_train_samples=5,
                                                    max_eval_samples=3), image_size=8)
    assert torch.equal(subset.images, whole.images[drawn]) and drawn != list(range(5))
    assert "only 3 image(s)" in capsys.readouterr().err and len(small) == 3

    with pytest.raises(ValueError, match="fewer than --knn_k 100 neighbours"):  # kNN with k > its bank
        scripts.pretrain.main(["--output_dir", str(tmp_path / "run"), "--dataset_name", str(parquet_folder),
                               "--config_overrides", tiny_overrides, "--per_device_train_batch_size", "16",
                               "--knn_k", "100"])
    assert not (tmp_path / "run").exists()


def test_3_do_train_false_evaluates_a_saved_model(pretrained_run, classification_run, scripts, parquet_folder,
                                                  image_folders, tmp_path):
    folder, _ = pretrained_run
    printed = run(scripts.pretrain.main, ["--do_train", "false", "--do_eval", "true", "--model_name_or_path",
                                          str(folder), "--dataset_name", str(parquet_folder), "--output_dir",
                                          str(tmp_path / "eval"), "--disable_tqdm", "true"])
    evaluation = read(tmp_path / "eval" / "eval_results.json")
    # the same images, masks and weights as the run's own final evaluation
    assert evaluation["eval_loss"] == pytest.approx(read(folder / "eval_results.json")["eval_loss"], rel=1e-4)
    assert not (tmp_path / "eval" / "model.safetensors").exists() and "[eval]" in printed

    finetuned, _ = classification_run
    run(scripts.finetune.main, ["--do_train", "false", "--model_name_or_path", str(finetuned), "--train_dir",
                                str(image_folders / "train"), "--validation_dir", str(image_folders / "val"),
                                "--output_dir", str(tmp_path / "ft_eval"), "--disable_tqdm", "true"])
    accuracy = read(tmp_path / "ft_eval" / "eval_results.json")["eval_accuracy"]
    assert accuracy == read(finetuned / "finetune_results.json")["eval_accuracy"]
    reordered = tmp_path / "reordered"  # the same three classes in another label order: refused, not scored
    reordered.mkdir()
    for split, count in (("train", 16), ("test", 8)):
        dataset = tiny_split(count, seed=2)
        dataset.cast_column("label", datasets.ClassLabel(names=["ship", "dog", "cat"])).to_parquet(
            str(reordered / f"{split}.parquet"))
    with pytest.raises(ValueError, match="predicts the classes"):
        scripts.finetune.main(["--do_train", "false", "--model_name_or_path", str(finetuned), "--dataset_name",
                               str(reordered), "--output_dir", str(tmp_path / "reordered_eval")])

    with pytest.raises(UsageError, match="pass --model_name_or_path"):
        scripts.pretrain.main(["--do_train", "false", "--output_dir", str(tmp_path / "none")])
    with pytest.raises(SystemExit):  # nothing to do
        parse_args((PretrainingArguments,), ["--output_dir", str(tmp_path), "--do_train", "false", "--do_eval",
                                             "false"])


def test_4_remove_unused_columns_and_push_to_hub(scripts, parquet_folder, tiny_overrides, tmp_path, monkeypatch):
    import transformers

    import mae_hf.publish

    def refuse(repo_id, token=None):
        raise ValueError("cannot reach the Hub (offline)")

    monkeypatch.setattr(mae_hf.publish, "hub_preflight", refuse)
    command = ["--dataset_name", str(parquet_folder), "--config_overrides", tiny_overrides,
               "--per_device_train_batch_size", "16", "--max_steps", "2", "--knn_eval", "false", "--disable_tqdm",
               "true", "--remove_unused_columns", "true", "--push_to_hub", "true", "--hub_model_id", "me/mae"]
    with pytest.raises(ValueError, match="offline"):  # before any work
        scripts.pretrain.main([*command, "--output_dir", str(tmp_path / "offline")])
    assert not (tmp_path / "offline").exists()

    pushed = []
    monkeypatch.setattr(mae_hf.publish, "hub_preflight", lambda repo_id, token=None: "me")
    monkeypatch.setattr(mae_hf.publish, "push", lambda folder, repo_id, **kwargs: pushed.append(
        (folder, repo_id, sorted(p.name for p in (tmp_path / "online").iterdir()))) or "https://hf.co/me/mae")
    monkeypatch.setattr(transformers.Trainer, "push_to_hub", lambda *args, **kwargs: pytest.fail("Trainer pushed"))
    printed = run(scripts.pretrain.main, [*command, "--output_dir", str(tmp_path / "online")])
    assert "--remove_unused_columns is ignored" in printed
    assert len(pushed) == 1 and pushed[0][:2] == (str(tmp_path / "online"), "me/mae")
    assert {"model.safetensors", "modeling_mae.py", "preprocessor_config.json",
            "pretraining_summary.json"} <= set(pushed[0][2])  # our finished folder, not a bare Trainer upload
    with pytest.raises(SystemExit):
        parse_args((PretrainingArguments,), ["--output_dir", str(tmp_path), "--push_to_hub", "true"])


def test_5_defaults_that_say_what_they_do(pretrained_run, scripts, parquet_folder, tmp_path, monkeypatch):
    with pytest.raises(UsageError, match="--random_init true"):
        scripts.finetune.main(["--dataset_name", str(parquet_folder), "--output_dir", str(tmp_path / "ft")])
    assert not (tmp_path / "ft").exists()

    folder, _ = pretrained_run  # visualize RUN: the run's own data (a local folder here), not the Hub default
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    run(scripts.visualize.main, [str(folder), "--output", str(tmp_path / "grid.png"), "--num_images", "2"])
    assert (tmp_path / "grid.png").is_file()
    checkpoint = next(folder.glob("checkpoint-*"))  # no summary there: the run settings saved with it
    run(scripts.visualize.main, [str(checkpoint), "--output", str(tmp_path / "grid2.png"), "--num_images", "2"])
    assert (tmp_path / "grid2.png").is_file()

    hint = scripts.pretrain.slow_hint(DataArguments(dataset_name=str(parquet_folder)))
    assert f"configs/cpu_small.yaml --dataset_name {parquet_folder} --output_dir" in hint


def test_6_output_says_what_a_user_checks(pretrained_run, classification_run, other_classifier, scripts,
                                          parquet_folder, tmp_path, capsys):
    folder, _ = pretrained_run
    probe = ["--model_name_or_path", str(folder), "--dataset_name", str(parquet_folder), "--probe_epochs", "2",
             "--knn", "false"]
    scripts.linear_probe.main([*probe, "--output_dir", str(tmp_path / "probe")])
    out, err = capsys.readouterr()
    assert "Features (train)" in err and "Probe head" in err  # progress bars
    assert "LOAD REPORT" not in out + err and out.count("encoder loaded; the probe's head is new") == 1
    assert "Loading weights" not in err and "Writing model shards" not in err
    scripts.linear_probe.main([*probe, "--output_dir", str(tmp_path / "quiet"), "--disable_tqdm", "true"])
    assert "Features (" not in capsys.readouterr().err

    # Something unexpected missing (a decoder, from a classifier checkpoint): transformers' report stays.
    model_args = ModelArguments(model_name_or_path=str(other_classifier))
    load_pretrained(MAEForPreTraining, model_args, MAEConfig.from_pretrained(other_classifier))
    assert "LOAD REPORT" in capsys.readouterr().err

    # The plan: epochs as --max_steps caps them; the measured line on a line of its own under a progress bar.
    args = PretrainingArguments(output_dir=str(tmp_path / "plan"), max_steps=100)
    callback = ThroughputCallback(16, measure_seconds=1e-9)
    callback.on_train_begin(args, types.SimpleNamespace(is_world_process_zero=True, max_steps=100), None,
                            train_dataloader=range(37))
    assert "(max_steps 100 = 2.7 epochs)" in capsys.readouterr().out
    from tqdm.auto import tqdm

    bar = tqdm(total=100, file=sys.stdout)
    for step in range(1, 6):
        bar.update(1)
        callback.on_step_end(args, types.SimpleNamespace(is_world_process_zero=True, max_steps=100,
                                                         global_step=step), None)
    bar.close()
    line = next(line for line in capsys.readouterr().out.split("\n") if "[plan] measured" in line)
    assert line.split("\r")[-1].startswith("[plan] measured")

    finetuned, printed = classification_run  # layer-wise lr decay: the logged learning rate is the peak one
    state = read(next(finetuned.glob("checkpoint-*/trainer_state.json")))
    rates = [entry["learning_rate"] for entry in state["log_history"]
             if "learning_rate" in entry]
    assert rates and set(rates) == {2e-5}
    assert "LOAD REPORT" not in printed and "(max_steps 3 = 1 epochs)" in printed

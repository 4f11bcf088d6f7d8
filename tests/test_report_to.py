"""`--report_to tensorboard` (and trackio): the Trainer's own integrations log pretraining and fine-tuning runs
(tensorboard: event files under OUTPUT_DIR/runs/) with the losses users look for. Needs the `logging` extra."""

import contextlib
import io

import pytest

pytest.importorskip("tensorboard", reason="the logging extra is not installed: pip install -e '.[logging]'")


def scalar_tags(output_dir) -> set[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    event_files = sorted(output_dir.glob("runs/*/events.out.tfevents.*"))
    assert event_files, f"no event files under {output_dir}/runs"
    tags = set()
    for path in event_files:
        accumulator = EventAccumulator(str(path))
        accumulator.Reload()
        tags |= set(accumulator.Tags()["scalars"])
    return tags


def test_tensorboard_logs_pretraining_and_finetuning(scripts, parquet_folder, tiny_overrides, pretrained_run, tmp_path):
    data = ["--dataset_name", str(parquet_folder), "--disable_tqdm", "true", "--report_to", "tensorboard",
            "--logging_steps", "1"]
    with contextlib.redirect_stdout(io.StringIO()):
        scripts.pretrain.main(["--output_dir", str(tmp_path / "pretrain"), "--config_overrides", tiny_overrides,
                               "--per_device_train_batch_size", "16", "--max_steps", "2", "--eval_steps", "2",
                               *data])
        scripts.finetune.main(["--model_name_or_path", str(pretrained_run[0]), "--output_dir",
                               str(tmp_path / "finetune"), "--per_device_train_batch_size", "16", "--max_steps", "2",
                               *data])
    assert {"train/loss", "train/learning_rate", "train/grad_norm", "eval/loss", "eval/knn_accuracy"} <= \
        scalar_tags(tmp_path / "pretrain")
    assert {"train/loss", "eval/accuracy"} <= scalar_tags(tmp_path / "finetune")


def test_trackio_logs_pretraining(scripts, parquet_folder, tiny_overrides, tmp_path, monkeypatch):
    """trackio (offline: a local SQLite database per project, under TRACKIO_DIR) through the Trainer's integration."""
    import json
    import sqlite3

    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "trackio"))  # read when trackio is first imported
    trackio = pytest.importorskip("trackio", reason="trackio is not installed: pip install -e '.[logging]'")
    database_path = trackio.utils.TRACKIO_DIR / f"mae-test-{tmp_path.name}.db"  # a fresh project
    with contextlib.redirect_stdout(io.StringIO()):
        scripts.pretrain.main(["--output_dir", str(tmp_path / "pretrain"), "--config_overrides", tiny_overrides,
                               "--dataset_name", str(parquet_folder), "--per_device_train_batch_size", "16",
                               "--max_steps", "2", "--eval_steps", "2", "--logging_steps", "1", "--disable_tqdm",
                               "true", "--report_to", "trackio", "--project", database_path.stem])
    with contextlib.closing(sqlite3.connect(database_path)) as database:
        logged = [json.loads(row[0]) for row in database.execute("SELECT metrics FROM metrics")]
    keys = set().union(*logged)
    assert {"train/loss", "eval/loss"} <= keys, keys

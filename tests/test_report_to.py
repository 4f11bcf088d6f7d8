"""`--report_to tensorboard`: the Trainer's own integration writes event files for pretraining and fine-tuning runs
(under OUTPUT_DIR/runs/), with the losses users look for. Needs the `logging` extra (tensorboard)."""

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
    assert {"train/loss", "train/learning_rate", "eval/loss"} <= scalar_tags(tmp_path / "pretrain")
    assert {"train/loss", "eval/accuracy"} <= scalar_tags(tmp_path / "finetune")

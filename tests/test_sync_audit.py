"""The hot loops never make the host wait for the GPU: each runs a few steps on the CPU under the sync audit
(tests/sync_audit.py), which plays a GPU and records every operation that would wait for it or copy from pageable
memory, with the project line that caused it. Steps that neither log, save nor evaluate must record nothing. Also a
compile audit: torch.compile (the aot_eager backend, on the CPU) of pretraining and fine-tuning compiles in the first
step and never again, without graph breaks; so does the evaluation of a saved classifier (the Trainer evaluates a
training run with the uncompiled model)."""

import contextlib
import io
import sys

import numpy as np
import pytest
import torch
from conftest import make_tiny_config
from sync_audit import (
    DEVICE,
    SyncAudit,
    middle_sections,
    on_device,
    quiet_sections,
    report,
    sections_per_call,
    trainer_callback,
    trainer_on_device,
)

import mae_hf.runs as runs
from mae_hf.training_args import ImageTrainingArguments

COUNTS = {}  # hot loop -> events per section, printed at the end (pytest -s) for the record


@pytest.fixture(scope="module", autouse=True)
def _print_counts():
    yield
    for loop, counts in COUNTS.items():
        print(f"[sync audit] {loop}: {counts}", file=sys.stderr)


def tiny_run_flags(folder, overrides, steps=5):
    """`steps` steps of 8 images, logging at the last one only, never saving or evaluating during training."""
    return ["--config_overrides", overrides, "--per_device_train_batch_size", "8", "--max_steps", str(steps),
            "--logging_steps", str(steps), "--save_steps", "100", "--eval_strategy", "no",
            "--per_device_eval_batch_size", "4", "--disable_tqdm", "true", "--report_to", "none",
            "--output_dir", str(folder)]


def audited_training(monkeypatch, main, argv) -> SyncAudit:
    """`main(argv)` (a training script) with its `run.train(trainer)` under the audit, then an evaluation."""
    audit = SyncAudit()
    train = runs.Run.train

    def audited(self, trainer):
        trainer.callback_handler.callbacks.insert(0, trainer_callback(audit))
        with trainer_on_device(trainer), audit:
            result = train(self, trainer)
            audit.section("eval batch 1")
            trainer.evaluate()
            audit.section(None)
        return result

    monkeypatch.setattr(runs.Run, "train", audited)
    with contextlib.redirect_stdout(io.StringIO()):
        main(argv)
    return audit


def assert_quiet(audit: SyncAudit, loop: str, sections: list[str]) -> None:
    COUNTS[loop] = dict(audit.counts())
    assert sections, f"{loop}: no step to check (the loop ran too few steps)"
    events = audit.in_sections(sections)
    assert not events, f"{loop}: operations that wait for the GPU in steps that neither log nor save:\n" + \
        report(events)


def check_training(audit: SyncAudit, loop: str) -> None:
    quiet = quiet_sections(audit, "train step")
    assert len(quiet) >= 3 and "log" in audit.marks["train step 5"], audit.marks  # steps 2-4 quiet, 5 logs
    assert_quiet(audit, loop, quiet + middle_sections(audit, "eval batch"))


def planted_loop(x, mask_source):
    total = x.sum()
    for _ in range(2):
        total.item()  # PLANTED item
        weights = torch.tensor([0.5, 0.5], device=x.device)  # PLANTED tensor
        if total:  # PLANTED if
            x = x * 2
        x[mask_source > 0] = 0  # PLANTED mask
        host = torch.ones(x.shape[-1])
        x = x + host  # PLANTED host
        x = x.cpu().to(DEVICE)  # PLANTED cpu
        x = x + weights.sum()
    return x


def test_the_audit_reports_each_planted_sync_with_its_line():
    lines = {marker: number for number, text in enumerate(open(__file__).read().splitlines(), 1)
             for marker in ("item", "tensor", "if", "mask", "host", "cpu") if f"# PLANTED {marker}" in text}
    audit = SyncAudit()
    with audit:
        x, mask = torch.ones(3, 2).to(DEVICE), torch.ones(3, 2).to(DEVICE)  # outside a section: not recorded
        audit.section("step 1")
        planted_loop(x, mask)
        audit.section(None)
        x.sum().item()  # outside a section again
    found = {(event.kind, event.where.rsplit(":", 1)[1]) for event in audit.events}
    expected = {("scalar read", lines["item"]), ("tensor from Python data", lines["tensor"]),
                ("scalar read", lines["if"]), ("data-dependent shape", lines["mask"]),
                ("host tensor in device op", lines["host"]), ("copy to host", lines["cpu"]),
                ("blocking copy to device", lines["cpu"])}
    assert {(kind, int(line)) for kind, line in found} == expected, report(audit.events)
    assert all(event.where.startswith("tests/test_sync_audit.py:") for event in audit.events)
    assert len(audit.events) == 2 * len(expected)  # once per iteration, none outside the section


def test_a_reverted_fix_fails_the_audit(monkeypatch):
    """RandAugment's grey weights built from Python data in every call (as before they were kept per device) are
    reported at the line that builds them."""
    from mae_hf import augment

    def grey_per_call(x):
        weights = torch.tensor(augment.GREY_WEIGHTS, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)  # PER CALL
        return (x * weights).sum(1, keepdim=True)

    images = torch.rand(4, 3, 8, 8)
    audit = SyncAudit()
    with audit:
        images = images.to(DEVICE, non_blocking=True)
        augment.contrast(images, torch.ones(4).to(DEVICE, non_blocking=True))  # the weights reach the device once
        audit.section("fixed")
        augment.contrast(images, torch.ones(4).to(DEVICE, non_blocking=True))
        monkeypatch.setattr(augment, "_grey", grey_per_call)
        audit.section("reverted")
        augment.contrast(images, torch.ones(4).to(DEVICE, non_blocking=True))
    assert audit.counts().get("fixed", 0) == 0, report(audit.events)
    line = next(n for n, text in enumerate(open(__file__).read().splitlines(), 1) if "# PER CALL" in text)
    assert [(event.kind, event.via) for event in audit.events] == \
        [("tensor from Python data", f"tests/test_sync_audit.py:{line}")]
    assert audit.events[0].where.startswith("mae_hf/augment.py:")  # the project line that called it


def test_pretraining_in_memory(monkeypatch, scripts, parquet_folder, tiny_overrides, tmp_path):
    audit = audited_training(monkeypatch, scripts.pretrain.main,
                             ["--dataset_name", str(parquet_folder), "--knn_eval", "false"]
                             + tiny_run_flags(tmp_path / "run", tiny_overrides))
    check_training(audit, "pretraining, data in memory")


@pytest.fixture(scope="module")
def prepared_folder(tmp_path_factory, scripts, parquet_folder):
    folder = tmp_path_factory.mktemp("prepared") / "out"
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        scripts.prepare_data.main(["--dataset_name", str(parquet_folder), "--output_dir", str(folder),
                                   "--short_side", "8"])
    return folder


def test_pretraining_from_a_prepared_folder_with_workers(monkeypatch, scripts, prepared_folder, tiny_overrides,
                                                         tmp_path):
    audit = audited_training(monkeypatch, scripts.pretrain.main,
                             ["--dataset_name", str(prepared_folder), "--data_in_memory", "false",
                              "--dataloader_num_workers", "1", "--knn_eval", "false"]
                             + tiny_run_flags(tmp_path / "run", tiny_overrides))
    check_training(audit, "pretraining, prepared folder, 1 worker")


def test_finetuning_default_recipe(monkeypatch, scripts, parquet_folder, tiny_overrides, tmp_path):
    audit = audited_training(monkeypatch, scripts.finetune.main,
                             ["--dataset_name", str(parquet_folder), "--random_init", "true"]
                             + tiny_run_flags(tmp_path / "run", tiny_overrides))
    check_training(audit, "fine-tuning, default recipe")


def test_finetuning_strong_recipe_with_the_data_on_the_device(monkeypatch, scripts, parquet_folder, tiny_overrides,
                                                              tmp_path):
    def on_the_device(self, data):  # as --data_on_device would on a GPU
        with SyncAudit():  # moves (and marks) the pixels and labels; records nothing outside a section
            data.to(DEVICE)
        return False

    monkeypatch.setattr(ImageTrainingArguments, "place_data_on_device", on_the_device)
    audit = audited_training(monkeypatch, scripts.finetune.main,
                             ["--dataset_name", str(parquet_folder), "--random_init", "true",
                              "--augment_policy", "randaugment", "--mixup_alpha", "0.8", "--cutmix_alpha", "1.0",
                              "--random_erasing", "0.25", "--repeated_augmentations", "2", "--ema_decay", "0.99"]
                             + tiny_run_flags(tmp_path / "run", tiny_overrides))
    check_training(audit, "fine-tuning, strong recipe, data on the device")


def audited_frozen_evaluation(scripts, argv) -> SyncAudit:
    """linear_probe.py on the audit's device, with a section per encoder forward ("features N"), per probe
    optimizer step ("SGD N", "AdamW N") and per kNN chunk ("knn N")."""
    from mae_hf.modeling_mae import MAEModel

    audit = SyncAudit()
    audit.open_on("topk", "knn")
    with sections_per_call(audit, MAEModel, "features"), sections_per_call(audit, optimizer_steps=True), audit:
        with contextlib.redirect_stdout(io.StringIO()):
            scripts.linear_probe.main(argv + ["--device", str(DEVICE), "--disable_tqdm", "true"])
    return audit


def test_frozen_feature_pass_knn_and_probes(scripts, parquet_folder, tiny_overrides, tmp_path):
    common = ["--dataset_name", str(parquet_folder), "--config_overrides", tiny_overrides,
              "--feature_batch_size", "4", "--probe_epochs", "2", "--probe_batch_size", "8"]
    audit = audited_frozen_evaluation(scripts, common + [
        "--output_dir", str(tmp_path / "multiblock"), "--feature_blocks", "2", "--attentive_probe", "true",
        "--attentive_epochs", "2", "--attentive_batch_size", "8", "--token_cache", "memory", "--knn_k", "5"])
    assert_quiet(audit, "features, kNN, multi-block and attentive probes",
                 middle_sections(audit, "features") + middle_sections(audit, "SGD step")
                 + middle_sections(audit, "AdamW step"))
    audit = audited_frozen_evaluation(scripts, common + ["--output_dir", str(tmp_path / "linear"), "--knn", "false"])
    assert_quiet(audit, "features and the linear probe",
                 middle_sections(audit, "features") + middle_sections(audit, "SGD step"))


def test_knn_votes(monkeypatch):
    from mae_hf.features import knn_predict

    audit = SyncAudit()
    audit.open_on("topk", "knn")
    with audit:
        bank, queries = torch.randn(40, 8).to(DEVICE), torch.randn(50, 8).to(DEVICE)
        labels = (torch.arange(40) % 3).to(DEVICE)
        knn_predict(bank, labels, queries, ks=(5, 20), num_classes=3, chunk_size=10)
    assert_quiet(audit, "kNN votes", middle_sections(audit, "knn"))


def compile_counts():
    """(graphs compiled, graph breaks) so far."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())


def compiled_training(monkeypatch, main, argv):
    """(frames compiled before each training step and before and after the evaluation, graph breaks)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    frames = {}
    train = runs.Run.train

    def watched(self, trainer):
        from transformers import TrainerCallback

        class Count(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                frames[state.global_step + 1] = compile_counts()[0]

        trainer.add_callback(Count())
        result = train(self, trainer)
        frames["before evaluation"] = compile_counts()[0]
        trainer.evaluate()
        frames["after evaluation"] = compile_counts()[0]
        trainer.evaluate()
        frames["after a second evaluation"] = compile_counts()[0]
        return result

    monkeypatch.setattr(runs.Run, "train", watched)
    with contextlib.redirect_stdout(io.StringIO()):
        main(argv + ["--torch_compile", "true", "--torch_compile_backend", "aot_eager"])
    return frames, compile_counts()[1]


@pytest.mark.parametrize("script", ["pretrain", "finetune"])
def test_compiles_once_without_graph_breaks(monkeypatch, scripts, parquet_folder, tiny_overrides, tmp_path, script):
    # Fine-tuning without label smoothing: the model computes its own loss (with it, the Trainer's label smoother
    # does), where transformers would settle `config.problem_type` at the first step and compile again at the second.
    extra = ["--knn_eval", "false"] if script == "pretrain" else ["--random_init", "true",
                                                                  "--label_smoothing_factor", "0"]
    frames, breaks = compiled_training(monkeypatch, getattr(scripts, script).main,
                                       ["--dataset_name", str(parquet_folder)] + extra
                                       + tiny_run_flags(tmp_path / "run", tiny_overrides, steps=4))
    assert breaks == 0
    assert frames[2] > 0 and frames[2] == frames[4] == frames["before evaluation"], frames  # compiled in step 1 only
    assert frames["after a second evaluation"] == frames["after evaluation"], frames  # (the Trainer evaluates eagerly)
    COUNTS[f"compile, {script}"] = frames


def test_a_compiled_evaluation_compiles_once_without_graph_breaks(monkeypatch, scripts, parquet_folder, tiny_overrides,
                                                                  tmp_path):
    """An evaluation of a saved classifier (--do_train false) runs the compiled model: one compile, then none."""
    from torch._dynamo.utils import counters

    from mae_hf.training import ImageTrainer

    flags = ["--dataset_name", str(parquet_folder), "--torch_compile", "true", "--torch_compile_backend", "aot_eager"]
    with contextlib.redirect_stdout(io.StringIO()):
        scripts.finetune.main(flags + ["--random_init", "true", "--do_train", "true", "--do_eval", "false"]
                              + tiny_run_flags(tmp_path / "run", tiny_overrides, steps=1))
    torch._dynamo.reset()
    counters.clear()
    graphs = []
    prediction_step = ImageTrainer.prediction_step

    def counted(self, *args, **kwargs):
        result = prediction_step(self, *args, **kwargs)
        graphs.append(compile_counts())
        return result

    monkeypatch.setattr(ImageTrainer, "prediction_step", counted)
    with contextlib.redirect_stdout(io.StringIO()):
        scripts.finetune.main(flags + ["--do_train", "false", "--model_name_or_path", str(tmp_path / "run"),
                                       "--output_dir", str(tmp_path / "eval"), "--per_device_eval_batch_size", "4",
                                       "--report_to", "none", "--disable_tqdm", "true"])
    assert len(graphs) == 4 and graphs == [(1, 0)] * 4, graphs  # 16 images, 4 batches: compiled in the first only
    COUNTS["compile, evaluation of a saved classifier"] = graphs


def test_a_split_on_the_device_takes_its_labels_with_it():
    """`InMemoryImages.to`: pixels and labels on the device (a batch and its labels are one gather there, with the
    index copied without waiting), sizes on the host (for the transforms)."""
    from mae_hf.data import ImageDataset
    from mae_hf.data.memory import InMemoryImages

    data = InMemoryImages(torch.zeros(6, 3, 4, 4, dtype=torch.uint8), torch.full((6, 2), 4, dtype=torch.int32),
                          labels=torch.arange(6))
    audit = SyncAudit()
    with audit:
        data.to(DEVICE)
        audit.section("batch")
        batch = ImageDataset(data, labels=True).__getitems__([4, 1, 2])
    assert not audit.events, report(audit.events)
    assert on_device(batch["pixel_values"]) and on_device(batch["labels"]) and batch["labels"].tolist() == [4, 1, 2]
    assert isinstance(batch["image_sizes"], np.ndarray)  # the Trainer's loader leaves it on the host


def test_feature_passes_and_multiblock_features_on_the_host():
    """The one frozen-feature pass (`encode_frozen`, also the kNN monitor's): pooled features stay on the device,
    multi-block features go to the host as they are extracted."""
    from mae_hf import MAEModel
    from mae_hf.data import BatchTransform
    from mae_hf.probes import encode_frozen

    config = make_tiny_config()
    encoder, transform = MAEModel(config), BatchTransform.for_model(config)
    images = torch.randint(0, 256, (12, 3, 8, 8), dtype=torch.uint8)
    audit = SyncAudit()
    with audit, sections_per_call(audit, MAEModel, "features"):
        encoder.to(DEVICE)
        pooled, blocks = encode_frozen(encoder, images, transform, batch_size=3, feature_blocks=2)
        monitor, _ = encode_frozen(encoder, images, transform, batch_size=3)
    assert on_device(pooled) and not on_device(blocks) and blocks.shape == (12, 2 * 2 * config.hidden_size)
    assert on_device(monitor) and monitor.shape == pooled.shape
    assert_quiet(audit, "feature passes", middle_sections(audit, "features"))


def test_gpu_settings_copy_batches_without_waiting_and_leave_constant_buffers(tmp_path):
    from mae_hf.training_args import FinetuneArguments, PretrainingArguments

    for arguments in (PretrainingArguments, FinetuneArguments):
        args = arguments(output_dir=str(tmp_path))
        assert args.accelerator_config.non_blocking and args.ddp_broadcast_buffers is False
    chosen = PretrainingArguments(output_dir=str(tmp_path), accelerator_config={"non_blocking": False})
    assert not chosen.accelerator_config.non_blocking  # a config given is kept

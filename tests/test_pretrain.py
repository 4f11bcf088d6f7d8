"""scripts/pretrain.py end to end on a tiny dataset: outputs, argument handling, faults, resume, DDP."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from mae_hf import MAEForPreTraining
from mae_hf.cli import UsageError, parse_args, parse_overrides, run_script
from mae_hf.data import BatchTransform, DataArguments, eval_crop_fraction, fixed_noise, load_image_splits
from mae_hf.loading import ModelArguments, build_config
from mae_hf.runs import RunError
from mae_hf.training_args import PretrainingArguments


def test_run_leaves_a_complete_folder(pretrained_run):
    folder, output = pretrained_run
    for name in ("model.safetensors", "config.json", "configuration_mae.py", "modeling_mae.py",
                 "preprocessor_config.json", "reconstructions.png", "loss_curve.png", "train_results.json",
                 "eval_results.json", "pretraining_summary.json"):
        assert (folder / name).is_file(), name
    config = json.loads((folder / "config.json").read_text())
    assert set(config["auto_map"]) == {"AutoConfig", "AutoModel", "AutoModelForPreTraining",
                                       "AutoModelForImageClassification"}
    assert config["norm_pix_loss"] is True  # the default recipe
    evaluation = json.loads((folder / "eval_results.json").read_text())
    assert 0 <= evaluation["eval_knn_accuracy"] <= 1 and evaluation["eval_loss"] > 0
    assert list((folder / "reconstructions").glob("step_*.png"))  # one picture per evaluation
    assert "[plan] device cpu" in output and "images/s" in output


def test_eval_loss_is_comparable_between_evaluations(pretrained_run, parquet_folder):
    folder, _ = pretrained_run
    model = MAEForPreTraining.from_pretrained(folder)
    data_args = DataArguments(dataset_name=str(parquet_folder))
    train, evaluation = load_image_splits(data_args, model.config.image_size)
    noise = fixed_noise(len(evaluation), model.config.num_patches, seed=42)
    crop = eval_crop_fraction(data_args, model.config.image_size, train)
    pixel_values = BatchTransform.for_model(model.config, eval_crop_fraction=crop)(evaluation.images, evaluation.sizes)
    bf16 = json.loads((folder / "pretraining_summary.json").read_text())["bf16"]  # the run's own precision
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        losses = [model(pixel_values, noise=noise).loss.item() for _ in range(2)]
    assert losses[0] == losses[1]
    recorded = json.loads((folder / "eval_results.json").read_text())["eval_loss"]
    assert recorded == pytest.approx(losses[0], rel=1e-4)  # the run's final eval used the same fixed noise


def test_yaml_config_with_flag_override(tmp_path, scripts):
    path = tmp_path / "run.yaml"
    path.write_text("learning_rate: 0.002\nnum_train_epochs: 7\nconfig_overrides: hidden_size=64\n")
    model_args, _, args = parse_args(
        (ModelArguments, DataArguments, PretrainingArguments),
        [str(path), "--output_dir", str(tmp_path / "out"), "--num_train_epochs", "3"])
    assert args.learning_rate == 0.002 and args.num_train_epochs == 3
    assert model_args.config_overrides == "hidden_size=64"
    path.write_text("learning_rat: 0.1\n")
    with pytest.raises(SystemExit):
        parse_args((ModelArguments, PretrainingArguments), [str(path)])


def test_learning_rate_follows_the_batch_unless_given(tmp_path, scripts):
    arguments = PretrainingArguments
    assert arguments(output_dir=str(tmp_path), per_device_train_batch_size=512).learning_rate == pytest.approx(3e-4)
    assert arguments(output_dir=str(tmp_path), learning_rate=1e-3).learning_rate == 1e-3


def test_overrides_are_typed_and_checked():
    assert parse_overrides("hidden_size=64, norm_pix_loss=false,mask_ratio=0.6,hidden_act=relu") == {
        "hidden_size": 64, "norm_pix_loss": False, "mask_ratio": 0.6, "hidden_act": "relu"}
    with pytest.raises(UsageError, match="unknown field"):  # usage errors: exit code 2
        build_config(ModelArguments(config_overrides="hiden_size=64"))
    with pytest.raises(UsageError, match=r"unknown field\(s\) \['return_dict'\]"):  # transformers' own fields
        build_config(ModelArguments(config_overrides="return_dict=false"))
    with pytest.raises(UsageError, match="hidden_size"):
        build_config(ModelArguments(config_overrides="hidden_size=100"))
    with pytest.raises(UsageError, match="key=value"):
        build_config(ModelArguments(config_overrides="hidden_size"))
    with pytest.raises(ValueError, match="key=value"):
        parse_overrides("hidden_size")


def test_refuses_to_overwrite_a_previous_run(pretrained_run, scripts, tiny_overrides, parquet_folder, capsys):
    folder, _ = pretrained_run
    before = sorted(os.listdir(folder))
    with pytest.raises(RunError, match="already holds a run"):
        scripts.pretrain.main(["--output_dir", str(folder), "--dataset_name", str(parquet_folder),
                               "--config_overrides", tiny_overrides])
    with pytest.raises(SystemExit) as exit_:  # on the command line: a usage error
        run_script(scripts.pretrain.main, ["--output_dir", str(folder), "--dataset_name", str(parquet_folder),
                                           "--config_overrides", tiny_overrides])
    assert exit_.value.code == 2 and "already holds a run" in capsys.readouterr().err
    assert sorted(os.listdir(folder)) == before


def test_too_few_images_for_one_batch_fail_before_training(tmp_path, scripts, tiny_overrides, parquet_folder):
    with pytest.raises(ValueError, match="has 48 images, fewer than one batch of 512"):
        scripts.pretrain.main(["--output_dir", str(tmp_path / "run"), "--dataset_name", str(parquet_folder),
                               "--config_overrides", tiny_overrides])
    assert not (tmp_path / "run").exists()


def test_missing_model_folder_lists_what_exists(tmp_path, scripts, parquet_folder):
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "mae").mkdir()
    with pytest.raises(ValueError, match="mea: no such file or folder.*holds: mae"):
        scripts.pretrain.main(["--output_dir", str(tmp_path / "run"), "--dataset_name", str(parquet_folder),
                               "--model_name_or_path", str(tmp_path / "runs" / "mea")])


def test_output_dir_is_required(scripts, parquet_folder, capsys):
    with pytest.raises(ValueError, match="--output_dir is required"):
        PretrainingArguments()
    with pytest.raises(SystemExit):  # on the command line: a usage error, not a traceback
        scripts.pretrain.main(["--dataset_name", str(parquet_folder)])
    assert "--output_dir is required" in capsys.readouterr().err


def test_final_evaluation_is_not_repeated(pretrained_run):
    folder, _ = pretrained_run
    history = json.loads((folder / "trainer_state.json").read_text())["log_history"]
    final_step = max(entry["step"] for entry in history)
    assert sum("eval_loss" in entry for entry in history if entry["step"] == final_step) == 1


def test_slow_run_on_a_cpu_is_flagged_before_training(tmp_path, capsys):
    from types import SimpleNamespace

    from mae_hf.training import ThroughputCallback

    args = PretrainingArguments(output_dir=str(tmp_path), use_cpu=True)  # the default recipe, run on a CPU
    for steps, flagged in ((29_680, True), (780, False)):
        callback = ThroughputCallback(512, slow_hint="use the small config")
        callback.on_train_begin(args, SimpleNamespace(is_world_process_zero=True, max_steps=steps), None)
        assert ("use the small config" in capsys.readouterr().out) == flagged


def test_long_cpu_run_of_a_small_model_gets_no_hint_to_use_the_small_config(tmp_path, capsys):
    """A CPU-sized run that is merely slow (a busy machine, a longer small run) is not told to use the config it
    already uses: the hint is for GPU-sized runs, and it is said before training."""
    from types import SimpleNamespace

    from mae_hf.training import ThroughputCallback

    args = PretrainingArguments(output_dir=str(tmp_path), use_cpu=True)
    callback = ThroughputCallback(128, slow_hint="use the small config", measure_seconds=0.0)
    state = SimpleNamespace(is_world_process_zero=True, max_steps=3710, global_step=3)
    callback.on_train_begin(args, state, None)
    callback.last_time, callback.seconds, callback.steps = 0.0, 10.0, 2  # 10 s a step: hours left
    callback.on_step_end(args, state, None)
    printed = capsys.readouterr().out
    assert "[plan] measured" in printed and "use the small config" not in printed


def test_the_plan_line_re_estimates_from_a_longer_window(tmp_path, capsys, monkeypatch):
    """The first estimate comes after the warm-up and a few steps; later ones, each time the measured time has grown
    fourfold, from the steps since the last one: a machine that got busier (steps 5x slower) shows in the next line
    instead of leaving the first, far too short, estimate standing."""
    from types import SimpleNamespace

    from mae_hf import training
    from mae_hf.training import ThroughputCallback

    clock = [0.0]
    monkeypatch.setattr(training.time, "perf_counter", lambda: clock[0])
    args = PretrainingArguments(output_dir=str(tmp_path), use_cpu=True)
    callback = ThroughputCallback(100, measure_seconds=10.0)
    callback.on_train_begin(args, SimpleNamespace(is_world_process_zero=True, max_steps=1000), None)
    capsys.readouterr()
    for step in range(1, 101):
        clock[0] += 30.0 if step <= 2 else (2.0 if step <= 10 else 10.0)  # warm-up, then idle, then busy
        callback.on_step_end(args, SimpleNamespace(is_world_process_zero=True, max_steps=1000, global_step=step), None)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[plan]")]
    assert lines[0] == "[plan] measured 50 images/s over 5 steps; about 33 min of training left (evaluations add to it)"
    assert lines[1].startswith("[plan] re-measured ") and " images/s over " in lines[1]
    assert lines[-1].startswith("[plan] re-measured 10 images/s over ")  # the busy machine's speed
    assert len(lines) <= 4  # a few lines, not one per step


def test_bad_column_fails_before_training(tmp_path, scripts, tiny_overrides, parquet_folder):
    with pytest.raises(ValueError, match=r"'img', 'label'"):
        scripts.pretrain.main(["--output_dir", str(tmp_path / "run"), "--dataset_name", str(parquet_folder),
                               "--config_overrides", tiny_overrides, "--image_column_name", "photo"])
    assert not (tmp_path / "run").exists()


def _command(output, tiny_overrides, parquet_folder, *extra):
    return [sys.executable, "scripts/pretrain.py", "--output_dir", str(output), "--dataset_name", str(parquet_folder),
            "--config_overrides", tiny_overrides, "--per_device_train_batch_size", "8", "--num_train_epochs", "2",
            "--logging_steps", "1", "--save_steps", "3", "--eval_steps", "100", "--knn_eval", "false",
            "--disable_tqdm", "true", *extra]


def _losses(folder):
    history = json.loads((folder / "trainer_state.json").read_text())["log_history"]
    return {entry["step"]: (entry["loss"], entry["learning_rate"]) for entry in history if "loss" in entry}


def test_resume_after_sigkill_matches_an_uninterrupted_run(tmp_path, repo_root, tiny_overrides, parquet_folder):
    # 3 epochs of 6 steps; checkpoints every 4 steps, so the kill after checkpoint-8 lands mid-epoch.
    environment = dict(os.environ, OMP_NUM_THREADS="1")
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    schedule = ("--num_train_epochs", "3", "--save_steps", "4")
    subprocess.run(_command(straight, tiny_overrides, parquet_folder, *schedule), cwd=repo_root, env=environment,
                   check=True, capture_output=True)
    process = subprocess.Popen(_command(killed, tiny_overrides, parquet_folder, *schedule), cwd=repo_root,
                               env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (killed / "checkpoint-8" / "trainer_state.json").exists():
        assert process.poll() is None and time.time() < deadline, "the run ended before its second checkpoint"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (killed / "model.safetensors").exists()  # it really was interrupted
    resumed = subprocess.run(_command(killed, tiny_overrides, parquet_folder, *schedule, "--resume_from_checkpoint",
                                      "last", "--log_level", "info"),
                             cwd=repo_root, env=environment, check=True, capture_output=True, text=True)
    assert "global step 8" in resumed.stderr  # continued from the checkpoint, not started over
    straight_losses, resumed_losses = _losses(straight), _losses(killed)
    assert max(straight_losses) == max(resumed_losses) == 18  # same final step
    for step in range(9, 19):  # the steps run after resuming: same loss, same learning rate
        assert resumed_losses[step] == straight_losses[step], step


LAUNCHERS = {
    "torchrun": ["-m", "torch.distributed.run", "--nproc_per_node", "2"],
    # --multi_gpu is accelerate's DDP launcher; without GPUs its processes train on the CPU over gloo
    "accelerate": ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                   "--mixed_precision", "no", "--dynamo_backend", "no"],
}


@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_two_process_ddp(tmp_path, repo_root, tiny_overrides, parquet_folder, launcher):
    output = tmp_path / "ddp"
    command = [sys.executable, *LAUNCHERS[launcher], "scripts/pretrain.py",
               *_command(output, tiny_overrides, parquet_folder)[2:]]
    result = subprocess.run(command, cwd=repo_root, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "x2" in result.stdout  # the plan names the world size
    state = json.loads((output / "trainer_state.json").read_text())
    assert state["global_step"] == 6  # 48 images / (2 processes x 8) x 2 epochs
    assert MAEForPreTraining.from_pretrained(output).config.hidden_size == 16


def test_cpu_defaults_bf16_where_native_without_compile(tmp_path):
    from mae_hf.precision import native_bf16

    args = PretrainingArguments(output_dir=str(tmp_path))  # the precision rule itself: tests/test_precision.py
    assert (args.bf16, args.torch_compile, args.device.type) == (native_bf16("cpu") is not None, False, "cpu")
    assert PretrainingArguments(output_dir=str(tmp_path), bf16=True).bf16  # the normal flag still works
    assert not PretrainingArguments(output_dir=str(tmp_path), bf16=False).bf16
    with pytest.raises(ValueError, match="crop_min_scale"):
        PretrainingArguments(output_dir=str(tmp_path), crop_min_scale=0)


def test_config_files_parse_and_reference_is_the_reference_recipe(tmp_path, repo_root):
    from mae_hf.training_args import FinetuneArguments

    configs = repo_root / "configs"
    for name, arguments in (("reference", PretrainingArguments), ("cpu_small", PretrainingArguments),
                            ("cpu_small_finetune", FinetuneArguments)):
        parse_args((ModelArguments, DataArguments, arguments),
                   [str(configs / f"{name}.yaml"), "--output_dir", str(tmp_path / name)])
    model_args, _, args = parse_args((ModelArguments, DataArguments, PretrainingArguments),
                                     [str(configs / "reference.yaml"), "--output_dir", str(tmp_path / "reference")])
    config = build_config(model_args)
    assert (config.hidden_size, config.num_hidden_layers, config.decoder_num_hidden_layers, config.mask_ratio,
            config.patch_size) == (192, 12, 4, 0.75, 2)
    assert (args.learning_rate, args.weight_decay, args.decay_all_parameters, args.max_grad_norm) == (1e-4, 1e-4,
                                                                                                       True, 0)
    assert (args.global_batch_size, args.seed, args.num_train_epochs, args.lr_scheduler_type) == (128, 42, 320,
                                                                                                   "cosine")
    assert (args.adam_beta1, args.adam_beta2, args.warmup_steps) == (0.9, 0.999, 0.05)


def test_fsdp_on_cpu_processes_is_refused_not_silently_ddp(tmp_path, repo_root, tiny_overrides, parquet_folder):
    # accelerate builds FSDP only for GPU-like devices: on CPU processes --fsdp would train as plain DDP
    command = [sys.executable, *LAUNCHERS["torchrun"], "scripts/pretrain.py",
               *_command(tmp_path / "fsdp", tiny_overrides, parquet_folder, "--fsdp", "full_shard auto_wrap")[2:]]
    result = subprocess.run(command, cwd=repo_root, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True,
                            text=True)
    assert result.returncode != 0 and "error: --fsdp shards the model over GPU processes" in result.stderr
    assert "Traceback" not in result.stderr.split("error: --fsdp")[0]
    assert not (tmp_path / "fsdp").exists()  # refused before anything was written


# What `--fsdp "full_shard auto_wrap"` does on GPUs, run by hand on two CPU processes (gloo): FSDP2's fully_shard on
# every `_no_split_modules` block, then the root (accelerate's transformer-based auto wrap), trained on each rank's
# half of the batch; its losses compared with the unsharded model's on the whole batch (DDP's gradients), its weights
# gathered, saved whole and loaded with the Auto classes, and resumed from a sharded checkpoint
# (torch.distributed.checkpoint, as the Trainer's SHARDED_STATE_DICT).
FSDP_WORKER = r"""
import json, sys
import torch, torch.distributed as dist, torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.distributed.fsdp import fully_shard
import mae_hf
from transformers import AutoModelForPreTraining

folder, overrides = sys.argv[1], json.loads(sys.argv[2])
dist.init_process_group("gloo")
rank = dist.get_rank()
config = mae_hf.MAEConfig(**overrides)
pixels = torch.rand(4, 8, 3, 8, 8, generator=torch.Generator().manual_seed(0))  # 4 steps of 8 images
noise = torch.rand(4, 8, 16, generator=torch.Generator().manual_seed(1))

def sharded(state=None):
    torch.manual_seed(0)
    model = mae_hf.MAEForPreTraining(config)
    for module in model.modules():
        if type(module).__name__ in model._no_split_modules:
            fully_shard(module)
    fully_shard(model)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)

def step(model, optimizer, index):
    half = slice(4 * rank, 4 * rank + 4)
    loss = model(pixel_values=pixels[index, half], noise=noise[index, half]).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    mean = loss.detach().clone()
    dist.all_reduce(mean)
    return mean.item() / 2

model, optimizer = sharded()
assert all(type(p).__name__ == "DTensor" for p in model.parameters())  # really sharded
losses = [step(model, optimizer, index) for index in range(2)]
dcp.save(dict(zip(("model", "optimizer"), get_state_dict(model, optimizer))), checkpoint_id=f"{folder}/checkpoint")
losses += [step(model, optimizer, index) for index in range(2, 4)]
resumed, resumed_optimizer = sharded()
state = dict(zip(("model", "optimizer"), get_state_dict(resumed, resumed_optimizer)))
dcp.load(state, checkpoint_id=f"{folder}/checkpoint")
set_state_dict(resumed, resumed_optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
resumed_losses = [step(resumed, resumed_optimizer, index) for index in range(2, 4)]
whole, _ = get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
if rank == 0:
    torch.manual_seed(0)
    reference = mae_hf.MAEForPreTraining(config)  # one process on the whole batch: DDP's losses and gradients
    reference_optimizer = torch.optim.AdamW(reference.parameters(), lr=1e-2)
    reference_losses = []
    for index in range(4):
        loss = reference(pixel_values=pixels[index], noise=noise[index]).loss
        loss.backward()
        reference_optimizer.step()
        reference_optimizer.zero_grad()
        reference_losses.append(loss.item())
    saved = mae_hf.MAEForPreTraining(config)
    saved.load_state_dict(whole)
    saved.save_pretrained(f"{folder}/saved")
    loaded = AutoModelForPreTraining.from_pretrained(f"{folder}/saved", trust_remote_code=True)
    difference = max((loaded.state_dict()[name] - value).abs().max().item() for name, value in whole.items())
    print(json.dumps({"losses": losses, "resumed": resumed_losses, "reference": reference_losses,
                      "loaded_vs_saved": difference, "loaded_class": type(loaded).__name__}))
dist.barrier()  # both processes end together: neither leaves while the other still talks to it
dist.destroy_process_group()
"""


def test_fsdp_full_shard_trains_resumes_and_saves_like_ddp(tmp_path, repo_root):
    from fixtures_runs import TINY_MODEL

    worker = tmp_path / "fsdp_worker.py"
    worker.write_text(FSDP_WORKER)
    command = [sys.executable, *LAUNCHERS["torchrun"], str(worker), str(tmp_path), json.dumps(TINY_MODEL)]
    environment = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(repo_root))
    result = subprocess.run(command, cwd=repo_root, env=environment, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["losses"] == pytest.approx(report["reference"], abs=1e-5)  # same losses as DDP, step by step
    assert report["resumed"] == pytest.approx(report["losses"][2:], abs=1e-6)  # from the sharded checkpoint
    assert report["loaded_vs_saved"] == 0 and report["loaded_class"] == "MAEForPreTraining"

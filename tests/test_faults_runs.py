"""Fault injection for training runs (issue 11, items 1, 3, 4, 5, 6, 9): divergence, two runs on one folder,
resume with changed settings, torn checkpoints, SIGTERM / SIGINT, unusable output folders, a full disk, and what
the run's summary records. Signals and the concurrent run use real processes; the rest runs the scripts in-process
through `run_script`, as the command line does. Each case checks the exit code, the error line, that no traceback
is shown, and the state of the output folder afterwards."""

import contextlib
import errno
import fcntl
import io
import json
import os
import pty
import re
import shutil
import signal
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mae_hf.cli import run_script
from mae_hf.runs import LOCK_NAME, NonFiniteError, Run, checkpoint_problem
from mae_hf.training import DivergenceGuard
from mae_hf.training_args import PretrainingArguments

STEPS_PER_EPOCH = 6  # 48 images, batch 8


def tiny_args(output, tiny_overrides, parquet_folder, *extra, finetune=False):
    """Flags of a tiny run: 48 images in batches of 8 for 2 epochs, a checkpoint every 3 steps."""
    return ["--output_dir", str(output), "--dataset_name", str(parquet_folder), "--config_overrides", tiny_overrides,
            "--per_device_train_batch_size", "8", "--num_train_epochs", "2", "--save_steps", "3", "--eval_steps",
            "100", "--logging_steps", "1", "--disable_tqdm", "true", *([] if finetune else ["--knn_eval", "false"]),
            *extra]


def run(scripts, argv, script="pretrain"):
    """(exit code, stdout, stderr) of `script.py argv` run in this process as the command line runs it."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            run_script(getattr(scripts, script).main, argv)
            code = 0
        except SystemExit as exit_:
            code = exit_.code
            if isinstance(code, str):  # sys.exit("error: ...") prints the text and exits 1
                print(code, file=sys.stderr)
                code = 1
    assert "Traceback" not in err.getvalue()
    return code, out.getvalue(), err.getvalue()


def checkpoint_names(folder):
    return sorted((path.name for path in folder.glob("checkpoint-*")), key=lambda name: int(name.split("-")[1]))


def assert_all_checkpoints_complete_and_finite(folder):
    for name in checkpoint_names(folder):
        assert checkpoint_problem(str(folder / name)) is None, name
        weights = load_file(folder / name / "model.safetensors")
        assert all(torch.isfinite(tensor).all() for tensor in weights.values()), name


def step_of(checkpoint):
    return json.loads((checkpoint / "trainer_state.json").read_text())["global_step"]


# ---- item 1: divergence ------------------------------------------------------------------------------------------

def test_diverging_run_saves_nothing_non_finite(tmp_path, scripts, tiny_overrides, parquet_folder):
    output = tmp_path / "run"
    code, _, err = run(scripts, tiny_args(output, tiny_overrides, parquet_folder, "--learning_rate", "1e3",
                                                  "--warmup_steps", "0", "--save_steps", "1", "--save_total_limit",
                                                  "10"))
    assert code == 1
    assert "error: Training diverged:" in err and "Nothing was saved from that state" in err
    assert not (output / "model.safetensors").exists()  # no final model
    saved = checkpoint_names(output)
    assert_all_checkpoints_complete_and_finite(output)
    if saved:
        assert f"The last checkpoint with finite weights is {output / saved[-1]}" in err
    else:
        assert "No checkpoint with finite weights exists" in err


def run_in_terminal(command, cwd, columns=160):
    """(exit code, bytes written) of `command` run on a pseudo-terminal, as a user's shell runs it: tqdm draws its
    bars there with carriage returns, as it does on a real terminal."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, columns, 0, 0))
    process = subprocess.Popen(command, cwd=cwd, stdin=slave, stdout=slave, stderr=slave,
                               env=dict(os.environ, OMP_NUM_THREADS="1"))
    os.close(slave)
    written = bytearray()
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: every writer has closed the terminal
            break
        if not chunk:
            break
        written += chunk
    os.close(master)
    return process.wait(timeout=300), written.decode(errors="replace")


def screen(written: str) -> list[str]:
    """The rows a terminal shows after `written`: carriage returns and cursor-up/erase escapes applied."""
    rows, row, column = [[]], 0, 0
    for token in re.findall(r"\x1b\[(\d*)([A-Za-z])|(\r)|(\n)|([^\x1b\r\n])", written):
        count, command, carriage, newline, char = token
        if carriage:
            column = 0
        elif newline:
            row += 1
            rows += [[] for _ in range(row + 1 - len(rows))]
        elif command == "A":
            row = max(row - int(count or 1), 0)
        elif command == "K":
            del rows[row][column:]
        elif char:
            line = rows[row]
            line += [" "] * (column - len(line))
            line[column:column + 1] = [char]
            column += 1
    return ["".join(line).rstrip() for line in rows]


def test_diverging_run_ends_on_its_error_line_in_a_terminal(tmp_path, repo_root, tiny_overrides, parquet_folder):
    """The Trainer's progress bar is closed before the error: it used to redraw after it (`5%|▌ | 2/40` last)."""
    argv = [arg for arg in tiny_args(tmp_path / "run", tiny_overrides, parquet_folder, "--learning_rate", "1e3",
                                     "--warmup_steps", "0") if arg not in ("--disable_tqdm", "true")]
    code, written = run_in_terminal([sys.executable, "scripts/pretrain.py", *argv], repo_root)
    rows = [row for row in screen(written) if row.strip()]
    assert code == 1, written[-3000:]
    assert "it/s]" in written  # the bars were drawn
    assert rows[-1].startswith("error: Training diverged:"), rows[-3:]
    assert all("error:" not in row for row in rows[:-1])  # one error line, on a row of its own


def test_divergence_guard_reads_the_device_flags_only_when_checking(tmp_path):
    args = PretrainingArguments(output_dir=str(tmp_path))
    model = torch.nn.Linear(2, 2)
    guard = DivergenceGuard()
    guard.observe_loss(torch.tensor(1.0))
    guard.observe_grad_norm(torch.tensor(float("inf")))  # a finite loss, an infinite gradient norm
    guard.observe_loss(torch.tensor(2.0))
    assert guard.flags.tolist() == [False, True]  # recorded on the tensor, nothing raised yet
    with pytest.raises(NonFiniteError, match="the gradient norm became non-finite at step 1. .*No checkpoint"):
        guard.check(args, 1, model)
    guard = DivergenceGuard()
    with torch.no_grad():
        model.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="the weights became"):
        guard.check(args, 3, model)
    assert not PretrainingArguments(output_dir=str(tmp_path)).logging_nan_inf_filter  # its per-step host sync is off


def test_finetune_divergence_is_caught_too(tmp_path, scripts, tiny_overrides, parquet_folder):
    output = tmp_path / "finetune"
    code, _, err = run(scripts, tiny_args(output, tiny_overrides, parquet_folder, "--learning_rate", "1e4",
                                          "--warmup_steps", "0", "--save_steps", "1", "--random_init", "true",
                                          finetune=True), script="finetune")
    assert code == 1 and "error: Training diverged:" in err
    assert not (output / "model.safetensors").exists()
    assert_all_checkpoints_complete_and_finite(output)


# ---- items 3 and 6: signals and a second run on the same folder (real processes) ----------------------------------

def _start(repo_root, output, tiny_overrides, parquet_folder, *extra):
    command = [sys.executable, "scripts/pretrain.py",
               *tiny_args(output, tiny_overrides, parquet_folder, "--max_steps", "100000", "--logging_steps", "50",
                          *extra)]
    return subprocess.Popen(command, cwd=repo_root, env=dict(os.environ, OMP_NUM_THREADS="1"), start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def signalled_runs(tmp_path_factory, repo_root, tiny_overrides, parquet_folder, scripts):
    """Two runs in their own processes, stopped by SIGTERM and SIGINT after their second checkpoint; while they run,
    a second run is started on the first one's folder. {signal name: (folder, exit code, stdout, stderr),
    "second": (exit code, stderr, pid it had to name)}. The SIGINT run reads through a DataLoader worker and gets
    its signal as Ctrl-C in a terminal sends it: to the whole process group, worker included."""
    root = tmp_path_factory.mktemp("signals")
    folders = {"SIGTERM": root / "term", "SIGINT": root / "int"}
    processes = {name: _start(repo_root, folder, tiny_overrides, parquet_folder,
                              *(["--dataloader_num_workers", "1"] if name == "SIGINT" else []))
                 for name, folder in folders.items()}
    deadline = time.time() + 180
    while not all(len(list(folder.glob("checkpoint-*/trainer_state.json"))) >= 2 for folder in folders.values()):
        assert all(p.poll() is None for p in processes.values()) and time.time() < deadline, "a run ended early"
        time.sleep(0.05)
    code, _, err = run(scripts, tiny_args(folders["SIGTERM"], tiny_overrides, parquet_folder))
    results = {"second": (code, err, processes["SIGTERM"].pid)}
    processes["SIGTERM"].send_signal(signal.SIGTERM)
    os.killpg(processes["SIGINT"].pid, signal.SIGINT)
    for name, process in processes.items():
        out, err = process.communicate(timeout=120)
        results[name] = (folders[name], process.returncode, out, err)
    return results


def test_second_run_on_a_folder_in_use_is_refused(signalled_runs):
    code, err, pid = signalled_runs["second"]
    assert code == 1
    assert f"is in use by another run (pid {pid} on" in err and "choose another --output_dir" in err


@pytest.mark.parametrize("name,code", [("SIGTERM", 143), ("SIGINT", 130)])
def test_signal_stops_at_a_step_and_says_how_to_resume(signalled_runs, name, code):
    folder, returncode, out, err = signalled_runs[name]
    assert returncode == code, err[-2000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    assert err.count(f"[stop] {name} received: stopping at the end of this step") == 1  # not again by a worker
    assert "train_runtime" not in out + err  # no train metrics that read like a finished run
    assert f"error: stopped by {name} after step" in err
    last = folder / checkpoint_names(folder)[-1]
    assert f"The last complete checkpoint is {last} (step {step_of(last)}); resume with: python scripts/pretrain.py" \
        in err and err.rstrip().endswith("--resume_from_checkpoint last")
    assert_all_checkpoints_complete_and_finite(folder)  # nothing partial left behind
    assert not (folder / "model.safetensors").exists() and not (folder / LOCK_NAME).exists()


def test_signal_before_training_ends_with_its_exit_code_and_leaves_nothing(tmp_path, capsys):
    output = tmp_path / "run"
    before = signal.getsignal(signal.SIGINT)  # default_int_handler, or SIG_IGN in a background job
    with pytest.raises(SystemExit) as exit_:
        with Run(PretrainingArguments(output_dir=str(output))):
            assert (output / LOCK_NAME).exists()
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C while the data loads: no KeyboardInterrupt traceback
            time.sleep(5)
    assert exit_.value.code == 130
    err = capsys.readouterr().err
    assert "error: stopped by SIGINT outside the training loop" in err and "No complete checkpoint exists" in err
    assert not output.exists()  # the folder it created, empty, is gone with the lock
    assert signal.getsignal(signal.SIGINT) is before  # handlers restored


# ---- items 4, 5 and 9: resume --------------------------------------------------------------------------------------

@pytest.fixture
def stopped_run(signalled_runs, tmp_path):
    """A copy of the SIGTERM-stopped run's folder, its newest checkpoint and that checkpoint's step."""
    folder = tmp_path / "run"
    shutil.copytree(signalled_runs["SIGTERM"][0], folder)
    last = folder / checkpoint_names(folder)[-1]
    return folder, last, step_of(last)


def test_resume_with_changed_settings_is_refused_with_the_differences(stopped_run, scripts, tiny_overrides,
                                                                        parquet_folder):
    folder, _, _ = stopped_run
    before = sorted(os.listdir(folder))
    for overrides, listed in ((tiny_overrides + ",mask_ratio=0.5", "model.mask_ratio: 0.75 in the checkpoint, 0.5 now"),
                              (tiny_overrides.replace("hidden_size=16,", "hidden_size=32,"),
                               "model.hidden_size: 16 in the checkpoint, 32 now")):
        code, _, err = run(scripts, tiny_args(folder, overrides, parquet_folder, "--max_steps", "100000",
                                              "--logging_steps", "50", "--resume_from_checkpoint", "last"))
        assert code == 1 and listed in err and "--allow_config_change true" in err
        assert sorted(os.listdir(folder)) == before  # nothing written
    # accepted, a size change still cannot load the checkpoint's weights: named, not a size-mismatch traceback
    code, _, err = run(scripts, tiny_args(folder, tiny_overrides.replace("hidden_size=16,", "hidden_size=32,"),
                                          parquet_folder, "--max_steps", "100000", "--logging_steps", "50",
                                          "--resume_from_checkpoint", "last", "--allow_config_change", "true"))
    assert code == 1 and "--resume_from_checkpoint" in err and "do not fit the model config" in err
    assert sorted(os.listdir(folder)) == before


def test_resume_in_another_precision_is_refused_then_recorded(stopped_run, scripts, tiny_overrides, parquet_folder):
    """bf16 is a setting of the run like the others: a resume in the other precision is refused with the difference,
    and once accepted (--allow_config_change) the summary and the card say which steps ran in which precision."""
    from mae_hf.publish import pretraining_text

    folder, last, step = stopped_run
    original = json.loads((last / "run_settings.json").read_text())["recipe"]["bf16"]
    other = "false" if original else "true"
    before = sorted(os.listdir(folder))
    code, _, err = run(scripts, tiny_args(folder, tiny_overrides, parquet_folder, "--max_steps", "100000",
                                          "--logging_steps", "50", "--resume_from_checkpoint", "last", "--bf16", other))
    assert code == 1 and f"recipe.bf16: {original!r} in the checkpoint, {not original!r} now" in err, err
    assert sorted(os.listdir(folder)) == before  # nothing written
    code, out, err = run(scripts, tiny_args(folder, tiny_overrides, parquet_folder, "--max_steps", str(step + 2),
                                            "--logging_steps", "50", "--resume_from_checkpoint", "last", "--bf16",
                                            other, "--allow_config_change", "true"))
    assert code == 0, err
    summary = json.loads((folder / "pretraining_summary.json").read_text())
    assert summary["bf16"] is (not original)
    assert summary["resumes"][-1]["changed"]["recipe.bf16"] == {"checkpoint": original, "now": not original}
    named = {True: "bf16 autocast", False: "fp32"}
    assert f"{named[original]}, {named[not original]} from step {step}" in pretraining_text(summary, "data")


def test_accepted_change_is_recorded_and_a_finished_run_trains_no_extra_step(stopped_run, scripts, tiny_overrides,
                                                                             parquet_folder):
    folder, last, step = stopped_run
    end = step + 4  # not at an epoch's end: the Trainer alone would train one step more on a second resume
    assert end % STEPS_PER_EPOCH
    code, out, err = run(scripts, tiny_args(folder, tiny_overrides, parquet_folder, "--max_steps", str(end),
                                            "--logging_steps", "50", "--resume_from_checkpoint", "last",
                                            "--allow_config_change", "true"))
    assert code == 0, err
    assert f"[resume] from {last} (step {step})" in out
    summary = json.loads((folder / "pretraining_summary.json").read_text())
    assert summary["steps"] == end and summary["epochs"] == pytest.approx(end / STEPS_PER_EPOCH)
    assert summary["epochs_requested"] == 2  # asked for, but --max_steps ended the run first
    assert summary["resumes"] == [{"checkpoint": str(last), "step": step, "changed": {
        "recipe.max_steps": {"checkpoint": 100000, "now": end}}}]

    train_results = (folder / "train_results.json").read_text()
    code, out, err = run(scripts, tiny_args(folder, tiny_overrides, parquet_folder, "--max_steps", str(end),
                                            "--logging_steps", "50", "--resume_from_checkpoint", "last"))
    assert code == 0, err
    assert f"[resume] from {folder / f'checkpoint-{end}'} (step {end})" in out and "nothing left to train" in out
    assert "'train_loss'" not in out
    state = json.loads((folder / "trainer_state.json").read_text())
    assert state["global_step"] == end and max(entry["step"] for entry in state["log_history"]) == end
    summary = json.loads((folder / "pretraining_summary.json").read_text())
    assert len(summary["resumes"]) == 2
    assert (folder / "train_results.json").read_text() == train_results  # not train metrics of no step
    assert summary["train_runtime_seconds"] == json.loads(train_results)["train_runtime"]  # the run's, kept


def test_a_resumed_runs_summary_and_card_describe_the_whole_run(stopped_run, scripts, tiny_overrides,
                                                               parquet_folder, tmp_path):
    """Stopped after a checkpoint and resumed: the summary, train_results.json and the card give the time and images
    of both segments (up to the checkpoint the resume started from, then to the end) with each segment's command."""
    folder, last, step = stopped_run
    first = json.loads((last / "run_settings.json").read_text())["segments"]
    assert len(first) == 1 and first[0]["steps"] == [0, step] and first[0]["seconds"] > 0
    assert first[0]["images"] == 8 * step and "--max_steps 100000" in first[0]["command"]
    end = step + 3
    code, _, err = run(scripts, tiny_args(folder, tiny_overrides, parquet_folder, "--max_steps", str(end),
                                          "--logging_steps", "50", "--resume_from_checkpoint", "last",
                                          "--allow_config_change", "true", "--eval_steps", str(end)))
    assert code == 0, err
    summary = json.loads((folder / "pretraining_summary.json").read_text())
    segments = summary["segments"]
    assert [segment["steps"] for segment in segments] == [[0, step], [step, end]]
    assert [segment["images"] for segment in segments] == [8 * step, 8 * 3]
    assert segments[1]["command"] == summary["command"] and segments[0] == first[0]  # the resume's, then the first
    total = round(first[0]["seconds"] + segments[1]["seconds"], 1)
    assert summary["train_runtime_seconds"] == total
    train_results = json.loads((folder / "train_results.json").read_text())
    assert train_results["train_runtime"] == total and train_results["train_images"] == 8 * end
    assert train_results["segments"] == segments and "train_loss" in train_results["last_segment"]
    assert "train_loss" not in train_results  # the Trainer's mean covers the last segment only

    out = tmp_path / "hub"
    scripts.publish.main([str(folder), "--output_dir", str(out)])
    card = (out / "README.md").read_text()
    assert (f"| Training time | {total:.0f} s for {8 * end:,} images in 2 segments (stopped and resumed at step "
            f"{step};") in card
    assert f"- started, trained to step {step}: `{first[0]['command']}`" in card
    assert f"- resumed from step {step}, trained to step {end}: `{segments[1]['command']}`" in card


def test_weights_follow_the_umask(stopped_run, scripts, tiny_overrides, parquet_folder, tmp_path):
    """model.safetensors (written by safetensors through a private temporary file) is readable like every other
    file the run writes: in the run, its checkpoints, a probe and a published folder."""
    from mae_hf.probes import save_head

    folder, _, step = stopped_run
    code, _, err = run(scripts, tiny_args(folder, tiny_overrides, parquet_folder, "--max_steps", str(step + 3),
                                          "--logging_steps", "50", "--resume_from_checkpoint", "last",
                                          "--allow_config_change", "true"))
    assert code == 0, err
    code, _, err = run(scripts, ["--model_name_or_path", str(folder), "--output_dir", str(tmp_path / "probe"),
                                 "--probe_epochs", "1", "--knn_k", "5", "--dataset_name", str(parquet_folder)],
                       script="linear_probe")
    assert code == 0, err
    scripts.publish.main([str(folder), "--probe", str(tmp_path / "probe"), "--output_dir", str(tmp_path / "hub")])
    umask = os.umask(0)
    os.umask(umask)
    expected = 0o666 & ~umask
    weights = [folder / "model.safetensors", folder / f"checkpoint-{step + 3}" / "model.safetensors",
               tmp_path / "probe" / "model.safetensors", tmp_path / "hub" / "model.safetensors",
               tmp_path / "head" / "linear_probe_head.safetensors"]
    save_head(torch.nn.Linear(2, 2), str(tmp_path / "head"), "linear_probe", {}, {})  # a probe's saved head
    for path in weights:
        assert path.stat().st_mode & 0o777 == expected, path
    assert (folder / "config.json").stat().st_mode & 0o777 == expected


@pytest.mark.parametrize("tear", ["empty_state", "truncated_state", "state_without_step", "truncated_weights",
                                  "truncated_optimizer"])
def test_torn_checkpoint_is_detected(stopped_run, tear):
    _, last, _ = stopped_run
    target = {"empty_state": "trainer_state.json", "truncated_state": "trainer_state.json",
              "state_without_step": "trainer_state.json", "truncated_weights": "model.safetensors",
              "truncated_optimizer": "optimizer.pt"}[tear]
    path = last / target
    data = path.read_bytes()
    path.write_bytes(b"" if tear == "empty_state" else b"{}" if tear == "state_without_step" else data[:len(data) // 2])
    assert target in checkpoint_problem(str(last))


def test_resume_last_falls_back_past_a_torn_checkpoint(stopped_run, scripts, tiny_overrides, parquet_folder):
    folder, last, step = stopped_run
    (last / "trainer_state.json").write_text("")  # written last by the Trainer: a save killed just before the end
    older = folder / checkpoint_names(folder)[-2]
    argv = tiny_args(folder, tiny_overrides, parquet_folder, "--max_steps", str(step_of(older) + 1),
                     "--logging_steps", "50", "--allow_config_change", "true")
    code, _, err = run(scripts, argv + ["--resume_from_checkpoint", str(last)])  # named explicitly: refused
    assert code == 1 and f"{last} is not a complete checkpoint: trainer_state.json does not parse" in err
    code, out, err = run(scripts, argv + ["--resume_from_checkpoint", "last"])
    assert code == 0, err
    assert f"[resume] {last} is incomplete (trainer_state.json does not parse" in out
    assert f"[resume] from {older} (step {step_of(older)})" in out
    assert (folder / f"incomplete-{last.name}").is_dir()  # kept for inspection, never picked again
    assert_all_checkpoints_complete_and_finite(folder)


# ---- item 6: output folders and a full disk -----------------------------------------------------------------------

def test_unusable_output_dir_is_refused_before_training(tmp_path, scripts, tiny_overrides, parquet_folder):
    a_file = tmp_path / "file"
    a_file.write_text("not a folder")
    code, _, err = run(scripts, tiny_args(a_file, tiny_overrides, parquet_folder))
    assert code == 2 and f"error: --output_dir {a_file} is a file, not a folder" in err  # a usage error
    code, _, err = run(scripts, tiny_args(a_file / "run", tiny_overrides, parquet_folder))
    assert code == 1 and f"--output_dir {a_file / 'run'} cannot be created (Not a directory)" in err
    assert a_file.read_text() == "not a folder"


def test_a_refused_start_leaves_no_folder_it_made(tmp_path, scripts, parquet_folder):
    """A fine-tune of a folder that is no model stops before any work: neither --output_dir nor the parents the run
    made for it stay behind ("nothing written"); a parent that existed before stays."""
    (tmp_path / "not_a_model").mkdir()
    (tmp_path / "not_a_model" / "notes.txt").write_text("not weights")
    output = tmp_path / "made" / "by" / "the_run"
    code, _, err = run(scripts, ["--model_name_or_path", str(tmp_path / "not_a_model"), "--output_dir", str(output),
                                 "--dataset_name", str(parquet_folder)], script="finetune")
    assert code == 1 and "is not a saved model" in err, err
    assert sorted(path.name for path in tmp_path.iterdir()) == ["not_a_model"]


@pytest.mark.skipif(not os.path.isdir("/sys/kernel"), reason="needs sysfs: a folder nobody may write to, root included")
def test_unwritable_output_dir_is_refused(scripts, tiny_overrides, parquet_folder):
    code, _, err = run(scripts, tiny_args("/sys/kernel", tiny_overrides, parquet_folder))
    assert code == 1 and "error: --output_dir /sys/kernel is not writable (Permission denied)" in err


def test_stale_lock_is_taken_over_and_results_say_what_ran(tmp_path, scripts, tiny_overrides, parquet_folder):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / LOCK_NAME).write_text("pid 999999 on a crashed machine\n")  # left by a run killed with SIGKILL
    code, _, err = run(scripts, tiny_args(folder, tiny_overrides, parquet_folder, "--max_steps", "1", "--random_init",
                                          "true", finetune=True), script="finetune")
    assert code == 0, err
    assert not (folder / LOCK_NAME).exists()
    results = json.loads((folder / "finetune_results.json").read_text())
    assert (results["steps"], results["epochs"], results["epochs_requested"], results["resumes"]) == (
        1, pytest.approx(1 / STEPS_PER_EPOCH), 2, [])  # what ran, not only what was asked


# A real full disk: the run's --output_dir is a small tmpfs, mounted in a private mount namespace (`unshare
# --mount`, as root or mapped to root in a user namespace), so it vanishes with the process whatever happens. The
# run fills it at a chosen point (after a checkpoint, or after training), leaving room for the files a save writes
# before model.safetensors and half of that file: the save then fails inside safetensors, as it would on a disk that
# fills up. What the run left is copied out before the namespace ends.
FULL_DISK_DRIVER = r"""
import os, runpy, sys
from transformers import TrainerCallback
import mae_hf.training

FILL_AFTER = os.environ["FILL_AFTER"]  # a step whose checkpoint is the last to fit, or "training"
DISK = os.environ["DISK"]


def fill(checkpoint):
    block = os.statvfs(DISK).f_frsize
    size = lambda name: -(-os.path.getsize(os.path.join(checkpoint, name)) // block) * block
    slack = sum(map(size, ("preprocessor_config.json", "configuration_mae.py", "modeling_mae.py", "config.json")))
    slack += size("model.safetensors") // 2
    stats = os.statvfs(DISK)
    with open(os.path.join(DISK, "filler"), "wb") as handle:
        handle.write(bytes(stats.f_bavail * stats.f_frsize - slack))


class FillDisk(TrainerCallback):
    def on_save(self, args, state, control, **kwargs):
        if str(state.global_step) == FILL_AFTER:
            fill(os.path.join(args.output_dir, f"checkpoint-{state.global_step}"))

    def on_train_end(self, args, state, control, **kwargs):
        if FILL_AFTER == "training":
            fill(os.path.join(args.output_dir, f"checkpoint-{state.global_step}"))


build = mae_hf.training.MAEPretrainer.__init__
def with_filler(self, *args, **kwargs):
    build(self, *args, **kwargs)
    self.add_callback(FillDisk())
mae_hf.training.MAEPretrainer.__init__ = with_filler
sys.argv = ["scripts/pretrain.py", *sys.argv[1:]]
runpy.run_path("scripts/pretrain.py", run_name="__main__")
"""


def run_on_a_full_disk(tmp_path, repo_root, argv_of, fill_after):
    """(exit code, stderr, copy of the output folder) of a pretraining run whose --output_dir is a 8 MiB tmpfs that
    fills up after `fill_after` (a step or "training")."""
    disk, copy = tmp_path / "disk", tmp_path / "copy"
    disk.mkdir()
    copy.mkdir()
    output = disk / "run"
    mount = [] if os.geteuid() == 0 else ["--map-root-user"]
    script = ('mount -t tmpfs -o size=8m tmpfs "$DISK" || exit 99; "$PYTHON" -c "$DRIVER" "$@"; code=$?; '
              'cp -a "$DISK/." "$COPY"; exit $code')
    environment = dict(os.environ, OMP_NUM_THREADS="1", DISK=str(disk), COPY=str(copy), PYTHON=sys.executable,
                       DRIVER=FULL_DISK_DRIVER, FILL_AFTER=str(fill_after))
    try:
        result = subprocess.run(["unshare", "--mount", *mount, "sh", "-c", script, "sh", *argv_of(output)],
                                cwd=repo_root, env=environment, capture_output=True, text=True, timeout=600)
    except FileNotFoundError:
        pytest.skip("needs unshare(1) to mount a tmpfs in a private mount namespace")
    if result.returncode == 99 or "unshare failed" in result.stderr:
        pytest.skip(f"cannot mount a tmpfs here (needs root or user namespaces): {result.stderr.strip()[-300:]}")
    return result.returncode, result.stderr, copy / "run", output


def leftovers(folder):
    """Partial files a failed save could leave: safetensors' and our staging names, empty or torn files."""
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*")
                  if path.name.startswith((".tmp", ".saving")) or path.name.endswith(".tmp"))


def test_full_disk_during_a_checkpoint_keeps_the_previous_one(tmp_path, repo_root, tiny_overrides, parquet_folder):
    code, err, copy, output = run_on_a_full_disk(
        tmp_path, repo_root, lambda out: tiny_args(out, tiny_overrides, parquet_folder), fill_after=3)
    assert code == 1, err[-3000:]
    assert "Traceback" not in err and "SafetensorError" not in err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert errors == [line for line in err.splitlines() if "error" in line.lower()]  # one error line, nothing else
    assert len(errors) == 1 and errors[0].startswith(
        f"error: Saving {output / 'checkpoint-6'} failed (No space left on device); the partial folder was removed. "
        f"The last complete checkpoint is {output / 'checkpoint-3'} (step 3); resume with:"), errors
    assert checkpoint_names(copy) == ["checkpoint-3"]
    assert_all_checkpoints_complete_and_finite(copy)
    assert not (copy / "model.safetensors").exists() and leftovers(copy) == []


def test_full_disk_during_the_final_save_leaves_no_torn_file(tmp_path, repo_root, tiny_overrides, parquet_folder):
    code, err, copy, output = run_on_a_full_disk(
        tmp_path, repo_root, lambda out: tiny_args(out, tiny_overrides, parquet_folder), fill_after="training")
    assert code == 1, err[-3000:]
    assert "Traceback" not in err and "SafetensorError" not in err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith(
        f"error: Saving the model to {output} failed (No space left on device); nothing of it was written there (no "
        f"torn file). The last complete checkpoint is {output / 'checkpoint-12'} (step 12); resume with:"), errors
    assert_all_checkpoints_complete_and_finite(copy)
    for name in ("model.safetensors", "config.json", "pretraining_summary.json"):
        assert not (copy / name).exists(), name
    assert leftovers(copy) == []


def test_write_failures_are_told_apart_from_bugs(tmp_path):
    from safetensors.torch import save_file

    from mae_hf.runs import write_failure

    assert write_failure(OSError(errno.ENOSPC, "No space left on device"), str(tmp_path)) == "No space left on device"
    assert write_failure(ValueError("a bug"), str(tmp_path)) is None
    assert write_failure(RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598"),
                         str(tmp_path)).startswith("[enforce fail")  # torch.save's, with room on the disk
    with pytest.raises(Exception) as error:  # safetensors' own error type, on a path it cannot write
        save_file({"x": torch.zeros(1)}, str(tmp_path / "missing" / "model.safetensors"))
    assert write_failure(error.value, str(tmp_path)) is not None


def test_ctrl_c_during_the_final_save_waits_for_it(tmp_path, scripts, tiny_overrides, parquet_folder, monkeypatch):
    """The signal arrives between the first file of the final save and the weights: the save ends whole, then the
    run stops with exit code 130."""
    import mae_hf.modeling_mae

    save = mae_hf.modeling_mae.MAEPreTrainedModel.save_pretrained

    def interrupted_save(model, folder, *args, **kwargs):
        if "checkpoint-" not in str(folder):
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C, delivered now, handled at the next Python instruction
        return save(model, folder, *args, **kwargs)

    monkeypatch.setattr(mae_hf.modeling_mae.MAEPreTrainedModel, "save_pretrained", interrupted_save)
    output = tmp_path / "run"
    code, _, err = run(scripts, tiny_args(output, tiny_overrides, parquet_folder))
    assert code == 130, err[-3000:]
    assert "[stop] SIGINT received: stopping once the model is saved whole" in err
    assert f"error: stopped by SIGINT while the final model was being saved; the model was saved whole in {output} " \
           "first; the run's results and summary were not written." in err
    assert checkpoint_problem(str(output)) is None or "trainer_state.json" in checkpoint_problem(str(output))
    model = mae_hf.modeling_mae.MAEForPreTraining.from_pretrained(output)  # whole: config and weights load
    assert all(torch.isfinite(tensor).all() for tensor in model.state_dict().values())
    assert not (output / "pretraining_summary.json").exists() and leftovers(output) == []


def test_ctrl_c_after_the_final_save_says_the_model_was_saved(tmp_path, scripts, tiny_overrides, parquet_folder,
                                                              monkeypatch):
    def interrupted_evaluation(trainer):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(5)

    monkeypatch.setattr(scripts.pretrain, "final_evaluation", interrupted_evaluation)
    output = tmp_path / "run"
    code, _, err = run(scripts, tiny_args(output, tiny_overrides, parquet_folder))
    assert code == 130, err[-3000:]
    assert f"error: stopped by SIGINT outside the training loop; the model was saved in {output}; the run's results " \
           "and summary were not written." in err
    assert (output / "model.safetensors").is_file() and not (output / "pretraining_summary.json").exists()


class _DiesInItsWorker(torch.utils.data.Dataset):
    """A dataset whose DataLoader worker is killed (as the OOM killer does) when it reads an item."""

    def __len__(self):
        return 4

    def __getitem__(self, index):
        os.kill(os.getpid(), signal.SIGKILL)


def test_a_killed_dataloader_worker_is_one_error_naming_the_likely_cause(capsys):
    def main(argv):
        list(torch.utils.data.DataLoader(_DiesInItsWorker(), num_workers=1))

    with pytest.raises(SystemExit) as stop:
        run_script(main, [])
    err = capsys.readouterr().err
    assert stop.value.code == 1 and "Traceback" not in err
    assert re.fullmatch(r"error: DataLoader worker \(pid \d+\) (exited unexpectedly|is killed by signal: Killed), "
                        r"which stops the script\. "
                        r"The likely cause is memory: .*/dev/shm.*--dataloader_num_workers.*\n", err)


def test_a_worker_killed_during_training_names_the_resume_command(tmp_path, repo_root, tiny_overrides,
                                                                  parquet_folder):
    output = tmp_path / "run"
    command = [sys.executable, "scripts/pretrain.py", "--output_dir", str(output), "--dataset_name",
               str(parquet_folder), "--config_overrides", tiny_overrides, "--per_device_train_batch_size", "8",
               "--num_train_epochs", "100", "--save_steps", "3", "--eval_steps", "1000", "--knn_eval", "false",
               "--disable_tqdm", "true", "--data_in_memory", "false", "--dataloader_num_workers", "1"]
    process = subprocess.Popen(command, cwd=repo_root, env=dict(os.environ, OMP_NUM_THREADS="1"),
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (output / "checkpoint-3" / "trainer_state.json").exists():
        assert process.poll() is None and time.time() < deadline, "the run ended before its first checkpoint"
        time.sleep(0.02)
    children = (Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text().split())
    workers = [pid for pid in map(int, children)
               if "pt_data_worker" in Path(f"/proc/{pid}/comm").read_text() or len(children) == 1]
    os.kill(workers[0], signal.SIGKILL)  # as the OOM killer does
    err = process.communicate(timeout=60)[1]
    assert process.returncode == 1 and "Traceback" not in err, err[-3000:]
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"error: DataLoader worker (pid {workers[0]})") and "/dev/shm" in line
    assert re.search(rf"The last complete checkpoint is {output}/checkpoint-\d+ \(step \d+\); resume with: python "
                     r"scripts/pretrain.py .* --resume_from_checkpoint last$", line), line


def test_processes_agree_on_a_stop_at_a_cadence_not_every_step(monkeypatch):
    """In a distributed run the stop is agreed by an all-reduce every STOP_CHECK_STEPS steps and at the steps that
    log, evaluate or save (the same on every process), not at every step; a signal on another process stops this
    one at the next of them, before anything more is saved."""
    from types import SimpleNamespace

    from transformers import TrainerControl

    from mae_hf.runs import STOP_CHECK_STEPS, StopOnSignal

    agreed_at, other = [], {"signum": 0}

    def all_reduce(tensor, op=None, group=None):
        agreed_at.append(state.global_step)
        tensor.fill_(max(int(tensor), other["signum"]))

    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "all_reduce", all_reduce)
    stop, args = StopOnSignal(), SimpleNamespace(world_size=2)
    state = SimpleNamespace(global_step=0, max_steps=10 * STOP_CHECK_STEPS)
    for step in range(1, 2 * STOP_CHECK_STEPS + 1):
        state.global_step, control = step, TrainerControl(should_save=step == 5)
        if step == STOP_CHECK_STEPS + 2:
            other["signum"] = signal.SIGTERM  # another process was signalled
        stop.on_step_end(args, state, control)
        if control.should_training_stop:
            break
    assert agreed_at == [5, STOP_CHECK_STEPS, 2 * STOP_CHECK_STEPS]
    assert stop.step == 2 * STOP_CHECK_STEPS and stop.signum == signal.SIGTERM
    assert not control.should_save and not control.should_evaluate

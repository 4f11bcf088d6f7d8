"""scripts/reproduce.py end to end on a tiny dataset with tiny settings: every step, then skipping and continuing."""

import json
import os
import sys

import pytest

from mae_hf.cli import UsageError

TINY_RUN = "--per_device_train_batch_size 16 --num_train_epochs 1 --disable_tqdm true"


def reproduce_argv(output_dir, parquet_folder, tiny_overrides):
    return ["--cpu_small", "--output_dir", str(output_dir), "--dataset_name", str(parquet_folder),
            "--feature_blocks", "2",
            "--pretrain_args", f"--config_overrides {tiny_overrides} {TINY_RUN} --eval_steps 2 --save_steps 2",
            "--probe_args", "--probe_epochs 2 --knn_k 5 --attentive_epochs 1 --attentive_heads 2 "
                            "--feature_batch_size 16 --disable_tqdm true",
            "--finetune_args", f"{TINY_RUN} --save_steps 2 --eval_steps 2"]


def modification_times(folder):
    return {path: os.path.getmtime(path) for path in sorted(map(str, folder.rglob("*_results.json")))}


@pytest.fixture(scope="module")
def reproduced(scripts, parquet_folder, tiny_overrides, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("reproduce") / "run"
    argv = reproduce_argv(output_dir, parquet_folder, tiny_overrides)
    scripts.reproduce.main(argv)
    return output_dir, argv


def test_every_step_writes_its_output(reproduced, capsys):
    output_dir, _ = reproduced
    for encoder in ("pretrained", "random_init"):
        for path in ("probe/linear_probe_results.json", "probe/knn_results.json",
                     "mae_probes/linear_probe_multiblock_results.json", "mae_probes/attentive_probe_results.json",
                     "finetune/finetune_results.json"):
            result = json.loads((output_dir / encoder / path).read_text())
            assert result["encoder"] == encoder, path
            protocol = os.path.basename(path).removesuffix("_results.json")
            assert result["protocol"] == ("finetune_strong" if protocol == "finetune" else protocol), path
    finetune = json.loads((output_dir / "pretrained" / "finetune" / "finetune_results.json").read_text())
    assert finetune["repeated_augmentations"] == 3 and finetune["mixup_alpha"] == 0.8  # the strong cpu recipe
    table = (output_dir / "comparison.md").read_text()
    for row in ("| Linear probe", "| Multi-block linear probe", "| Attentive probe", "| kNN, k = 5",
                "| Fine-tune, strong recipe"):
        assert row in table, row
    # what a step records is its own command, which runs on its own (reproduce.py's flags would not)
    command = json.loads((output_dir / "mae" / "pretraining_summary.json").read_text())["command"]
    assert command.startswith("python scripts/pretrain.py ") and f"--output_dir {output_dir / 'mae'}" in command
    assert "--cpu_small" not in command and "--pretrain_args" not in command
    card = (output_dir / "hub" / "README.md").read_text()
    assert f"Command: `{command}`" in card
    assert "Attentive probe" in card and (output_dir / "hub" / "finetuned" / "model.safetensors").is_file()
    assert '`finetuned/`: the classifier of the "Fine-tune, strong recipe' in card


def test_a_second_run_skips_every_step(reproduced, scripts, capsys):
    output_dir, argv = reproduced
    before = modification_times(output_dir)
    capsys.readouterr()
    scripts.reproduce.main(argv)
    printed = capsys.readouterr().out
    assert printed.count("skipped") >= 11 and "python scripts/" not in printed
    assert modification_times(output_dir) == before


def test_other_settings_are_refused_before_any_step(reproduced, scripts, capsys):
    """A finished step is not skipped under a command that now says otherwise: refused, naming step and flag."""
    output_dir, argv = reproduced
    before = modification_times(output_dir)
    changed = [value.replace("--knn_k 5", "--knn_k 3") for value in argv]
    with pytest.raises(UsageError, match=r"probe_pretrained in .*--knn_k \(was 5, now 3\).*new --output_dir"):
        scripts.reproduce.main(changed)
    other_data = [*argv, "--dataset_name", str(output_dir / "elsewhere")]
    with pytest.raises(UsageError, match=r"pretrain in .*--dataset_name \(was .*, now .*elsewhere\)"):
        scripts.reproduce.main(other_data)
    assert "python scripts/" not in capsys.readouterr().out
    assert modification_times(output_dir) == before


def test_an_interrupted_run_continues(reproduced, scripts, capsys, repo_root, monkeypatch):
    output_dir, argv = reproduced
    monkeypatch.chdir(repo_root)  # the printed config path is relative to the current folder
    # a fine-tune killed after its checkpoints, a probe folder left without one of its two results
    (output_dir / "random_init" / "finetune" / "finetune_results.json").unlink()
    (output_dir / "pretrained" / "mae_probes" / "attentive_probe_results.json").unlink()
    kept = output_dir / "pretrained" / "probe" / "linear_probe_results.json"
    kept_time = os.path.getmtime(kept)
    capsys.readouterr()
    scripts.reproduce.main(argv)
    printed = capsys.readouterr().out
    # the printed step command runs as printed: its config path relative to the current folder
    assert f"finetune.py {os.path.join('configs', 'cpu_small_finetune_strong.yaml')} " in printed
    assert "finetune_random_init: incomplete, resuming from its last complete checkpoint" in printed
    assert "mae_probes_pretrained: incomplete, starting over" in printed
    assert (output_dir / "pretrained" / "mae_probes.incomplete").is_dir()
    for name in ("pretrain", "probe_pretrained", "probe_random_init", "finetune_pretrained"):
        assert f"[reproduce] {name}: done already" in printed, name
    for name in ("compare", "publish"):  # redone: an earlier step ran
        assert f"[reproduce] {name}: python scripts/" in printed, name
    assert (output_dir / "random_init" / "finetune" / "finetune_results.json").is_file()
    assert (output_dir / "pretrained" / "mae_probes" / "attentive_probe_results.json").is_file()
    assert os.path.getmtime(kept) == kept_time


def test_a_stopped_step_advises_its_own_resume_command(scripts, tmp_path, monkeypatch):
    """The advice printed when a step stops names the step's script, not reproduce.py (which takes no
    --resume_from_checkpoint); sys.argv is reproduce's own again afterwards."""
    import sys

    import mae_hf.runs

    advised = []
    step = scripts.reproduce.Step("pretrain", "pretrain", ["--output_dir", str(tmp_path / "mae")], str(tmp_path),
                                  ("never",), trainer=True)
    monkeypatch.setattr(scripts.reproduce, "load_script", lambda name: type("Script", (), {
        "main": staticmethod(lambda argv: advised.append(mae_hf.runs.resume_command()))}))
    before = list(sys.argv)
    with pytest.raises(ValueError, match="ended without writing never"):
        step.run()
    assert advised == [f"python scripts/pretrain.py --output_dir {tmp_path / 'mae'} --resume_from_checkpoint last"]
    assert sys.argv == before


def test_a_failing_step_names_itself(scripts, parquet_folder, tmp_path):
    with pytest.raises(ValueError, match="step pretrain failed .*same command again"):
        scripts.reproduce.main(["--output_dir", str(tmp_path / "run"), "--dataset_name", str(tmp_path / "nothing"),
                                "--cpu_small"])
    with pytest.raises(SystemExit):
        scripts.reproduce.main(["--output_dir", str(tmp_path / "run"), "--feature_blocks", "1"])


@pytest.mark.parametrize("stop, code", [(SystemExit(143), 143), (KeyboardInterrupt(), 130)])
def test_a_step_stopped_by_a_signal_ends_with_its_code(scripts, tmp_path, monkeypatch, capsys, stop, code):
    """One `error:` line (the step's own when it reports the stop itself), and the step's exit code."""
    def stopped(argv):
        if isinstance(stop, SystemExit):
            print("error: stopped by SIGTERM after step 2; resume with: python scripts/pretrain.py ...",
                  file=sys.stderr)
        raise stop

    monkeypatch.setattr(scripts.reproduce, "load_script", lambda name: type("Script", (), {
        "main": staticmethod(stopped)}))
    with pytest.raises(SystemExit) as exit:
        scripts.reproduce.main(["--output_dir", str(tmp_path / "run")])
    assert exit.value.code == code
    printed = capsys.readouterr().err
    assert printed.count("error:") == 1 and "same reproduce.py command again to continue" in printed


def test_feature_blocks_beyond_the_pretrained_encoder_fail_before_pretraining(scripts, parquet_folder, tiny_overrides,
                                                                               tmp_path):
    argv = reproduce_argv(tmp_path / "run", parquet_folder, tiny_overrides)
    argv[argv.index("--feature_blocks") + 1] = "4"
    with pytest.raises(UsageError, match=r"--feature_blocks 4: the encoder has 2 layer\(s\), so it takes 1 to 2"):
        scripts.reproduce.main(argv)
    assert not (tmp_path / "run").exists()

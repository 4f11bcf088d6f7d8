"""Hub tokens never reach a file, a card, a printed line or the Hub (issue 17). Every script that takes token flags
runs with them (both `--flag value` and `--flag=value`); then every byte it wrote (JSON, the pickled
training_args.bin of the run and of each checkpoint, optimizer states, weights, pictures), everything it printed and
everything it uploaded (the Hub's HfApi replaced at its boundary) is searched for the tokens."""

import contextlib
import fnmatch
import io
import json
import sys
from pathlib import Path

import huggingface_hub
import huggingface_hub.constants
import pytest
import torch

from mae_hf.cli import MAEHFError, run_script
from mae_hf.publish import files_holding, push
from mae_hf.redaction import REDACTED, recorded_command, redact, redact_argv, redact_text
from mae_hf.runs import OutputLock, resume_advice

HUB_TOKEN = "hf_" + "Hub0Token1Secret2" * 2  # the shape the Hub issues: hf_ and 34 letters and digits
TOKEN = "hf_" + "Read3Only4Token5x" * 2
SECRETS = (HUB_TOKEN, TOKEN)


class FakeHub:
    """HfApi's network calls replaced: `uploaded` holds every file an upload sent ({repo: {path: bytes}})."""

    def __init__(self, monkeypatch):
        self.uploaded = {}
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(huggingface_hub.HfApi, "whoami", lambda api, token=None, **kwargs: {"name": "me"})
        for name in ("create_repo", "create_branch"):
            monkeypatch.setattr(huggingface_hub.HfApi, name, lambda api, *args, **kwargs: None)
        monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", lambda api, **kwargs: self.upload_folder(**kwargs))

    def upload_folder(self, *, repo_id, folder_path, ignore_patterns=None, **kwargs):
        root = Path(folder_path)
        self.uploaded[repo_id] = {
            str(path.relative_to(root)): path.read_bytes() for path in sorted(root.rglob("*"))
            if path.is_file() and not any(fnmatch.fnmatch(path.name, pattern) for pattern in ignore_patterns or ())}
        from types import SimpleNamespace

        return SimpleNamespace(commit_url=f"https://huggingface.co/{repo_id}/commit/0", pr_url=None)


def run(main, argv, monkeypatch, script, **kwargs):
    """(exit code, printed text) of `script` run as the command line runs it, sys.argv included (it is recorded)."""
    argv = [str(arg) for arg in argv]
    monkeypatch.setattr(sys, "argv", [f"scripts/{script}.py", *argv])
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            run_script(main, argv, **kwargs)
            code = 0
        except SystemExit as exit_:
            code = exit_.code
    return code, out.getvalue() + err.getvalue()


def leaks(folder: Path) -> list[str]:
    """Files under `folder` whose bytes hold either token."""
    return files_holding(str(folder), SECRETS)


def assert_no_token(text: str) -> None:
    assert not any(secret in text for secret in SECRETS), text[-3000:]


@pytest.fixture(scope="module")
def token_runs(tmp_path_factory, scripts, parquet_folder, tiny_overrides):
    """Every script that takes token flags, run with them: pretrain and finetune (with --push_to_hub), the linear
    probe, kNN, show_augmentations and publish (with --push_to_hub). {name: (exit code, printed)}, the folders
    and what was uploaded."""
    monkeypatch = pytest.MonkeyPatch()
    hub = FakeHub(monkeypatch)
    root = tmp_path_factory.mktemp("tokens")
    tiny = ["--dataset_name", parquet_folder, "--config_overrides", tiny_overrides, "--disable_tqdm", "true"]
    trainer_flags = ["--per_device_train_batch_size", "16", "--num_train_epochs", "1", "--save_steps", "2",
                     "--eval_steps", "2"]
    printed = {}
    printed["pretrain"] = run(scripts.pretrain.main, [
        "--output_dir", root / "mae", *tiny, *trainer_flags, "--hub_token", HUB_TOKEN, f"--token={TOKEN}",
        "--push_to_hub", "true", "--hub_model_id", "me/mae"], monkeypatch, "pretrain")
    config = root / "finetune.yaml"  # a token in a config file's values
    config.write_text(f"hub_token: {HUB_TOKEN}\npush_to_hub: true\nhub_model_id: me/finetune\n")
    printed["finetune"] = run(scripts.finetune.main, [
        config, "--model_name_or_path", root / "mae", "--output_dir", root / "finetune", *tiny, *trainer_flags,
        "--token", TOKEN], monkeypatch, "finetune")
    config.unlink()  # the user's own file, not something a script wrote
    probe = ["--model_name_or_path", root / "mae", *tiny, "--knn_k", "2", "--probe_epochs", "1", "--token", TOKEN]
    printed["linear_probe"] = run(scripts.linear_probe.main, [*probe, "--output_dir", root / "probe"], monkeypatch,
                                  "linear_probe")
    printed["knn"] = run(scripts.linear_probe.main, [*probe, "--output_dir", root / "knn"], monkeypatch, "knn",
                         linear_probe=False)
    printed["show_augmentations"] = run(scripts.show_augmentations.main, [
        *tiny, "--output_dir", root / "pictures", "--num_images", "2", f"--token={TOKEN}",
        f"--hub_token={HUB_TOKEN}"], monkeypatch, "show_augmentations")
    # publish, from a run whose summary was written before tokens were redacted: it must not copy the token on
    summary_path = root / "mae" / "pretraining_summary.json"
    summary = json.loads(summary_path.read_text())
    summary_path.write_text(json.dumps(dict(summary, command=f"python scripts/pretrain.py --hub_token {HUB_TOKEN} "
                                                             f"--token={TOKEN} --output_dir x")))
    printed["publish"] = run(scripts.publish.main, [
        root / "mae", "--probe", root / "probe", "--finetune", root / "finetune", "--output_dir", root / "hub",
        "--push_to_hub", "true", "--hub_model_id", "me/published", "--hub_token", HUB_TOKEN], monkeypatch, "publish")
    summary_path.write_text(json.dumps(summary))  # as the run wrote it
    yield root, printed, hub.uploaded
    monkeypatch.undo()


def test_scripts_with_token_flags_ran(token_runs):
    _, printed, uploaded = token_runs
    for name, (code, text) in printed.items():
        assert code == 0, (name, text[-3000:])
    assert set(uploaded) == {"me/mae", "me/finetune", "me/published"}


def test_no_file_written_holds_a_token(token_runs):
    root, _, _ = token_runs
    assert leaks(root) == []
    binaries = sorted(root.rglob("training_args.bin"))
    assert len(binaries) >= 4  # each run folder and each of its checkpoints
    for path in binaries:  # the pickled arguments still load, without the token
        args = torch.load(path, weights_only=False)
        assert args.hub_token is None and args.output_dir


def test_nothing_uploaded_or_printed_holds_a_token(token_runs):
    _, printed, uploaded = token_runs
    for files in uploaded.values():
        for name, content in files.items():
            assert not any(secret.encode() in content for secret in SECRETS), name
    assert "training_args.bin" in uploaded["me/mae"] and ".run.lock" not in uploaded["me/mae"]
    for _, text in printed.values():
        assert_no_token(text)


def test_records_say_a_token_was_given(token_runs):
    root, _, uploaded = token_runs
    command = json.loads((root / "mae" / "pretraining_summary.json").read_text())["command"]
    assert f"--hub_token {REDACTED}" in command.replace(f"'{REDACTED}'", REDACTED)
    assert f"--token={REDACTED}" in command.replace(f"'--token={REDACTED}'", f"--token={REDACTED}")
    card = uploaded["me/published"]["README.md"].decode()
    assert f"--hub_token {REDACTED}" in card and f"--token={REDACTED}" in card  # an old summary's command


def test_redaction_rules():
    argv = ["scripts/pretrain.py", "--hub_token", HUB_TOKEN, f"--token={TOKEN}", "--hub-token", "x", "--use_auth_token",
            "--push_to_hub", "--pretrain_args", f"--hub_token {HUB_TOKEN} --lr 1", "--dataset_name", f"{TOKEN}/data",
            "--token", "--output_dir", "out"]
    assert redact_argv(argv) == [
        "scripts/pretrain.py", "--hub_token", REDACTED, f"--token={REDACTED}", "--hub-token", REDACTED,
        "--use_auth_token", "--push_to_hub", "--pretrain_args", f"--hub_token {REDACTED} --lr 1", "--dataset_name",
        f"{REDACTED}/data", "--token", "--output_dir", "out"]  # a bare flag keeps the next flag
    assert redact_text(f"python x.py --token '{TOKEN}' --hub_token=\"a b\" --args '--my_token q' {HUB_TOKEN}") == \
        f"python x.py --token {REDACTED} --hub_token={REDACTED} --args '--my_token {REDACTED}' {REDACTED}"
    assert redact({"hub_token": "abc", "token": None, "use_auth_token": True, "token_cache": "memory",
                   "nested": [{"command": f"x --token {TOKEN}"}, HUB_TOKEN]}) == {
        "hub_token": REDACTED, "token": None, "use_auth_token": True, "token_cache": "memory",
        "nested": [{"command": f"x --token {REDACTED}"}, REDACTED]}
    assert redact_text("hf_datasets_cache and hf_short stay") == "hf_datasets_cache and hf_short stay"
    assert TOKEN not in recorded_command(["scripts/pretrain.py", "--token", TOKEN])


def test_resume_command_printed_on_a_stop_has_no_token(tmp_path, monkeypatch):
    checkpoint = tmp_path / "checkpoint-3"
    checkpoint.mkdir()
    (checkpoint / "trainer_state.json").write_text('{"global_step": 3}')
    monkeypatch.setattr("mae_hf.runs.checkpoint_problem", lambda folder: None)
    monkeypatch.setattr(sys, "argv", ["scripts/pretrain.py", "--output_dir", str(tmp_path), "--hub_token", HUB_TOKEN,
                                      f"--token={TOKEN}", "--resume_from_checkpoint", "last"])
    advice = resume_advice(str(tmp_path))
    assert_no_token(advice)
    assert "--resume_from_checkpoint last" in advice and f"tokens are shown as {REDACTED}" in advice


def test_the_lock_names_its_command_without_tokens(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["scripts/pretrain.py", "--hub_token", HUB_TOKEN, f"--token={TOKEN}"])
    lock = OutputLock(str(tmp_path)).acquire()  # .run.lock names the run holding the folder
    try:
        text = (tmp_path / ".run.lock").read_text()
    finally:
        lock.release()
    assert_no_token(text)
    assert "scripts/pretrain.py --hub_token" in text


def test_reproduce_prints_its_steps_without_tokens(scripts, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["scripts/reproduce.py"])
    with pytest.raises(ValueError, match="step pretrain failed"):  # at once: no such dataset
        scripts.reproduce.main(["--output_dir", str(tmp_path / "run"), "--dataset_name", str(tmp_path / "none"),
                                "--cpu_small", "--pretrain_args", f"--hub_token {HUB_TOKEN} --token={TOKEN}"])
    printed = capsys.readouterr()
    assert "[reproduce] pretrain: python scripts/pretrain.py" in printed.out
    assert_no_token(printed.out + printed.err)


def test_push_refuses_a_folder_holding_a_token(tmp_path, monkeypatch):
    hub = FakeHub(monkeypatch)
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    (tmp_path / "model" / "notes.bin").write_bytes(b"\x00\x01" + HUB_TOKEN.encode() + b"\x02")
    with pytest.raises(MAEHFError, match=r"Refusing to upload .*notes\.bin hold\(s\) a Hub token"):
        push(str(tmp_path / "model"), "me/model", token=HUB_TOKEN)
    assert hub.uploaded == {}
    monkeypatch.setenv("HF_TOKEN", HUB_TOKEN)  # the token of the environment counts too
    with pytest.raises(MAEHFError, match="notes.bin"):
        push(str(tmp_path / "model"), "me/model")
    (tmp_path / "model" / "notes.bin").unlink()
    push(str(tmp_path / "model"), "me/model")
    assert list(hub.uploaded["me/model"]) == ["config.json"]


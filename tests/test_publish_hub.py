"""What `publish.py --push_to_hub true` sends to the Hub, with huggingface_hub's network calls replaced at the
HfApi boundary (whoami, create_repo, create_branch, upload_folder): the repository, its privacy, the token, the
branch or pull request, the commit message and the exact files. The uploaded files, laid out as the Hub cache holds
a downloaded repository, then load by Hub id in a process without mae_hf exactly as the local folder does."""

import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import huggingface_hub.constants
import pytest

from mae_hf.cli import UsageError
from mae_hf.publish import HubPushError

TOKEN = "hf_test_token_0123456789"
COMMIT = "0123abcd" * 5  # a commit id as the Hub gives one (40 hex digits)


class FakeHub:
    """Records every call the push makes; `fail` names a method that raises as a network error would."""

    def __init__(self, fail: str | None = None):
        self.calls, self.uploaded, self.fail = [], {}, fail

    def install(self, monkeypatch):
        for name in ("whoami", "create_repo", "create_branch", "upload_folder"):
            monkeypatch.setattr(huggingface_hub.HfApi, name, self.method(name))

    def method(self, name):
        def call(api, *args, **kwargs):
            self.calls.append((name, args, dict(kwargs, api_token=api.token)))
            if name == self.fail:
                raise ConnectionError("[Errno -2] Name or service not known")
            if name == "whoami":
                return {"name": "me"}
            if name == "upload_folder":
                root = Path(kwargs["folder_path"])
                self.uploaded = {str(path.relative_to(root)): path.read_bytes()
                                 for path in sorted(root.rglob("*")) if path.is_file()}
                url = f"https://huggingface.co/{kwargs['repo_id']}/commit/{COMMIT}"
                return SimpleNamespace(commit_url=url, pr_url=f"https://huggingface.co/{kwargs['repo_id']}/discussions/1"
                                       if kwargs.get("create_pr") else None)
            return None
        return call

    def named(self, name):
        return [kwargs | {"args": args} for call, args, kwargs in self.calls if call == name]


@pytest.fixture
def online(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_TOKEN", raising=False)


def publish_args(pretrained_run, out: Path, *extra) -> list[str]:
    folder, _ = pretrained_run
    return [str(folder), "--output_dir", str(out), "--space", "true", "--push_to_hub", "true",
            "--hub_model_id", "me/mae-tiny", *extra]


def test_push_sends_the_whole_folder_with_the_flags(pretrained_run, scripts, tmp_path, monkeypatch, online):
    hub = FakeHub()
    hub.install(monkeypatch)
    monkeypatch.setenv("HF_TOKEN", TOKEN)  # the token users export; --hub_token would win over it
    out = tmp_path / "hub"
    scripts.publish.main(publish_args(pretrained_run, out, "--hub_private_repo", "true", "--hub_revision", "v1",
                                      "--commit_message", "MAE tiny, first upload"))

    assert [call for call, _, _ in hub.calls] == ["whoami", "create_repo", "create_branch", "upload_folder"]
    assert hub.named("whoami")[0]["token"] == TOKEN
    create = hub.named("create_repo")[0]
    assert create["args"] == ("me/mae-tiny",) and create["private"] is True and create["repo_type"] == "model"
    assert hub.named("create_branch")[0]["branch"] == "v1"
    upload = hub.named("upload_folder")[0]
    assert upload["repo_id"] == "me/mae-tiny" and upload["folder_path"] == str(out)
    assert upload["revision"] == "v1" and upload["create_pr"] is False
    assert upload["commit_message"] == "MAE tiny, first upload"
    assert not any(upload.get(key) for key in ("allow_patterns", "ignore_patterns", "delete_patterns"))
    assert {call[2]["api_token"] for call in hub.calls if call[0] != "whoami"} == {None}  # HF_TOKEN: hub default

    # Exactly the local folder, byte for byte, and everything a Hub user needs is in it.
    local = {str(path.relative_to(out)): path.read_bytes() for path in sorted(out.rglob("*")) if path.is_file()}
    assert hub.uploaded == local
    for name in ("model.safetensors", "config.json", "configuration_mae.py", "modeling_mae.py",
                 "preprocessor_config.json", "README.md", "reconstructions.png", "loss_curve.png",
                 "results/pretraining_summary.json", "app.py", "visualize.py", "precision.py", "requirements.txt",
                 "examples/cat.png"):
        assert name in hub.uploaded, name
    card = hub.uploaded["README.md"].decode()
    assert "\nsdk: gradio\n" in card and "\napp_file: app.py\n" in card and '"me/mae-tiny"' in card


def test_push_as_pull_request_with_a_token_flag(pretrained_run, scripts, tmp_path, monkeypatch, online, capsys):
    hub = FakeHub()
    hub.install(monkeypatch)
    scripts.publish.main(publish_args(pretrained_run, tmp_path / "hub", "--create_pr", "true", "--hub_token", TOKEN))
    assert [call for call, _, _ in hub.calls] == ["whoami", "create_repo", "upload_folder"]  # a PR needs no branch
    assert hub.named("whoami")[0]["token"] == TOKEN
    assert {call[2]["api_token"] for call in hub.calls[1:]} == {TOKEN}
    upload = hub.named("upload_folder")[0]
    assert upload["create_pr"] is True and upload["revision"] is None and upload["commit_message"] == "Upload hub"
    assert hub.named("create_repo")[0]["private"] is False
    assert "pushed: https://huggingface.co/me/mae-tiny/discussions/1" in capsys.readouterr().out


@pytest.mark.parametrize("case", ["offline", "no token", "no network", "malformed id"])
def test_push_preflight_fails_before_anything(pretrained_run, scripts, tmp_path, monkeypatch, online, case):
    hub = FakeHub(fail="whoami" if case == "no network" else None)
    hub.install(monkeypatch)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)  # no stored `hf auth login` token either
    args = publish_args(pretrained_run, tmp_path / "hub")
    if case != "no token":
        args += ["--hub_token", TOKEN]
    if case == "offline":
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    if case == "malformed id":
        args[args.index("me/mae-tiny")] = "me/mae tiny/x"
    message = {"offline": "HF_HUB_OFFLINE is set", "no token": "not logged in. Run `hf auth login`, set HF_TOKEN",
               "no network": "checking the token with the Hub failed (ConnectionError",
               "malformed id": "is not a valid Hub repository id"}[case]
    with pytest.raises(UsageError if case == "malformed id" else ValueError, match=re.escape(message)) as error:
        scripts.publish.main(args)  # a malformed id is a usage error: run_script exits 2 for it
    assert "\n" not in str(error.value)  # one line
    assert not (tmp_path / "hub").exists()
    assert [call for call, _, _ in hub.calls] == (["whoami"] if case == "no network" else [])


def test_failed_upload_leaves_the_folder_complete(pretrained_run, scripts, tmp_path, monkeypatch, online):
    hub = FakeHub(fail="upload_folder")
    hub.install(monkeypatch)
    with pytest.raises(HubPushError, match=r"Pushing to the Hub failed \(ConnectionError.*is complete: upload it later "
                                         r"with `hf upload me/mae-tiny \S+ --revision dev --private`"):
        scripts.publish.main(publish_args(pretrained_run, tmp_path / "hub", "--hub_token", TOKEN,
                                          "--hub_revision", "dev", "--hub_private_repo", "true"))
    for name in ("model.safetensors", "README.md", "app.py", "results/pretraining_summary.json"):
        assert (tmp_path / "hub" / name).is_file(), name


LOAD_BY_ID = r'''
import sys
class RefuseMaeHf:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "mae_hf":
            raise ImportError("hidden")
sys.meta_path.insert(0, RefuseMaeHf())
import torch
from transformers import AutoImageProcessor, AutoModelForPreTraining
noise = torch.rand(1, 16, generator=torch.Generator().manual_seed(0))
pixels = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(1))
outputs = []
for source in ("me/mae-tiny", sys.argv[1]):
    model = AutoModelForPreTraining.from_pretrained(source, trust_remote_code=True).eval()
    processor = AutoImageProcessor.from_pretrained(source)
    with torch.no_grad():
        outputs.append((type(model).__module__, model(pixels, noise=noise).logits, processor.size))
(hub_module, hub_logits, hub_size), (local_module, local_logits, local_size) = outputs
assert hub_module.startswith("transformers_modules.") and local_module.startswith("transformers_modules.")
assert torch.equal(hub_logits, local_logits) and hub_size == local_size, (hub_size, local_size)
print("same")
'''


def test_pushed_files_load_by_hub_id_like_the_folder(pretrained_run, scripts, tmp_path, monkeypatch, online):
    hub = FakeHub()
    hub.install(monkeypatch)
    scripts.publish.main(publish_args(pretrained_run, tmp_path / "hub", "--hub_token", TOKEN))
    # What a download of the pushed repository leaves in the Hub cache: snapshots/<commit>/<files>, refs/main.
    cache = tmp_path / "hf_home" / "hub" / "models--me--mae-tiny"
    for name, content in hub.uploaded.items():
        (cache / "snapshots" / COMMIT / name).parent.mkdir(parents=True, exist_ok=True)
        (cache / "snapshots" / COMMIT / name).write_bytes(content)
    (cache / "refs").mkdir()
    (cache / "refs" / "main").write_text(COMMIT)
    environment = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "HF_HUB_CACHE")}
    environment.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"))
    result = subprocess.run([sys.executable, "-c", LOAD_BY_ID, str(tmp_path / "hub")], cwd=tmp_path, env=environment,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "same", result.stderr[-3000:]


def test_the_card_reads_the_device_as_recorded_now_and_before(pretrained_run):
    """Results record the device as "<processes> x <type>"; summaries written before held the device alone, beside
    world_size: the card's Hardware line reads both."""
    import json

    from mae_hf.publish import pretraining_text

    folder, _ = pretrained_run
    summary = json.loads((folder / "pretraining_summary.json").read_text())
    for device, world_size, shown in (("1 x cpu", 1, "1 x cpu"), ("2 x cuda", 2, "2 x cuda"),
                                      ("cuda:0", 2, "2 x cuda:0"), ("cpu", 1, "1 x cpu")):
        text = pretraining_text(dict(summary, device=device, world_size=world_size), None)
        assert f"| Hardware | {shown}, " in text, text

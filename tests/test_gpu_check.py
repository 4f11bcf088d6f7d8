"""scripts/gpu_check.sh, the one command a lent GPU runs: its dry mode runs every step on the CPU at tiny sizes with
the carry's layout and writes the files a GPU run brings back (at most 8); its preflight stops on what nothing can
run without, and adapts to the rest (no compiler, little /dev/shm, no data); a step over its cap or failing does
not stop the next."""

import json
import os
import shutil
import subprocess
import tarfile
import zipfile

import pytest
import torch

OUTPUT_FILES = {"summary.md", "results.json", "log.txt", "results.tar.gz"}
ALL_STEPS = ("pipeline", "model", "pretrain", "probe", "finetune", "vit_b")


def gpu_check(repo_root, tmp_path, *args, **environment):
    """(exit code, stdout + stderr) of `bash scripts/gpu_check.sh args` with OUT and RUNS under tmp_path."""
    env = dict(os.environ, OUT=str(tmp_path / "out"), RUNS=str(tmp_path / "runs"), OMP_NUM_THREADS="1",
               **{key: str(value) for key, value in environment.items()})
    result = subprocess.run(["bash", "scripts/gpu_check.sh", *args], cwd=repo_root, env=env, capture_output=True,
                            text=True, timeout=900)
    return result.returncode, result.stdout + result.stderr


def results(tmp_path) -> dict:
    return json.loads((tmp_path / "out" / "results.json").read_text())


@pytest.fixture
def carry(tmp_path, parquet_folder):
    """A carry folder laid out as scripts/build_gpu_carry.sh makes it: cifar10/train.parquet and wheels/, here with
    one small wheel of a package this Python lacks (so the preflight installs it)."""
    folder = tmp_path / "carry"
    (folder / "cifar10").mkdir(parents=True)
    shutil.copy(parquet_folder / "train.parquet", folder / "cifar10" / "train.parquet")
    (folder / "wheels").mkdir()
    name, version = "gpu_check_carried", "1.0"
    with zipfile.ZipFile(folder / "wheels" / f"{name}-{version}-py3-none-any.whl", "w") as wheel:
        info = f"{name}-{version}.dist-info"
        wheel.writestr(f"{name}/__init__.py", "")
        wheel.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        wheel.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                        "Tag: py3-none-any\n")
        wheel.writestr(f"{info}/RECORD", "")
    return folder


def test_dry_run_brings_back_what_a_gpu_run_would(repo_root, tmp_path, carry):
    # /dev/shm taken as 30 MB: the ViT-B step's 2 workers (batches of 3 MB) are lowered to 1, and said
    code, output = gpu_check(repo_root, tmp_path, "--dry", CARRY=carry, SHM_FREE_MB=30, DRY_VIT_B_WORKERS=2)
    assert code == 0, output[-4000:]
    assert "Traceback" not in output
    out = tmp_path / "out"
    assert set(os.listdir(out)) == OUTPUT_FILES  # at most 8 files come back from the GPU machine
    record = results(tmp_path)
    preflight = record["preflight"]
    assert preflight["status"] == "ok" and preflight["installed_from_carry"] == ["gpu_check_carried-1.0"]
    assert preflight["data"]["folder"] == str(carry / "cifar10") and preflight["data"]["images"] == 48
    assert preflight["compile"]["on"], preflight["compile"]
    assert preflight["shared_memory"]["workers"] == 1 and "1 worker(s) instead of 2" in preflight["notes"][0]
    steps = record["steps"]
    assert list(steps) == list(ALL_STEPS) and all(steps[step]["status"] == "ok" for step in ALL_STEPS), steps
    assert steps["pipeline"]["figures"]["sync_debug_steps"] == 2
    assert steps["pipeline"]["figures"]["sync_warnings"] is None  # counted on CUDA only: not a zero on the CPU
    assert steps["vit_b"]["figures"]["data_workers"] == 1  # the preflight's decision reached the step
    assert "configs/models/mae_vit_base_patch16.json" not in steps["vit_b"]["command"]  # tiny in a dry run
    assert 0 < steps["model"]["figures"]["mae_hf_images_per_s"]
    for key in ("linear_probe_accuracy", "knn_accuracy"):
        assert 0 <= steps["probe"]["figures"][key] <= 1
    assert 0 <= steps["finetune"]["figures"]["eval_accuracy"] <= 1
    assert "configs/finetune_strong.yaml" in steps["finetune"]["command"]
    summary = (out / "summary.md").read_text()
    for step in ALL_STEPS:
        assert f"| {step} | " in summary, step
    assert "| preflight | " in summary and "1 worker(s) instead of 2" in summary
    with tarfile.open(out / "results.tar.gz") as archive:
        names = set(archive.getnames())
    assert {"benchmark_pipeline.json", "benchmark_model.json", "benchmark_vit_b.json",
            "pretrain/pretraining_summary.json", "probe/linear_probe_results.json", "probe/knn_results.json",
            "finetune/finetune_results.json"} <= names
    assert not any(name.startswith(("site/", "data/")) or "checkpoint-" in name for name in names)
    assert "[gpu_check] done in" in (out / "log.txt").read_text()


@pytest.mark.parametrize("case, environment, why", [
    ("no compiler", {"CC": "/nonexistent/cc"}, "no C compiler (CC=/nonexistent/cc not found)"),
    ("compile fails", {"SMOKE_BACKEND": "no_such_backend"}, "a one-line torch.compile failed: "),
])
def test_preflight_turns_compile_off_when_it_cannot_work(repo_root, tmp_path, carry, case, environment, why):
    code, output = gpu_check(repo_root, tmp_path, "--dry", CARRY=carry, STEPS="preflight", **environment)
    assert code == 0, output[-3000:]
    compile_record = results(tmp_path)["preflight"]["compile"]
    assert not compile_record["on"] and compile_record["why"].startswith(why), compile_record
    assert "torch.compile OFF: " + why in (tmp_path / "out" / "summary.md").read_text()


def test_a_step_over_its_cap_is_stopped_and_the_next_still_runs(repo_root, tmp_path, carry):
    code, output = gpu_check(repo_root, tmp_path, "--dry", CARRY=carry, STEPS="model probe pretrain", CAP_MODEL=11)
    assert code == 0, output[-3000:]
    steps = results(tmp_path)["steps"]
    assert steps["model"]["status"] == "stopped at its cap (1 s)" and steps["model"]["seconds"] <= 11
    assert steps["probe"]["status"] == "skipped: no pretrained model (pretrain did not finish)"
    assert steps["pretrain"]["status"] == "ok" and steps["pretrain"]["figures"]["eval_loss"] > 0


def test_without_data_the_cifar10_steps_are_skipped_and_said(repo_root, tmp_path, carry):
    shutil.rmtree(carry / "cifar10")
    code, output = gpu_check(repo_root, tmp_path, "--dry", CARRY=carry, DATA=tmp_path / "missing",
                             STEPS="pretrain probe finetune")
    assert code == 0, output[-3000:]
    record = results(tmp_path)
    assert "train.parquet does not read as a parquet file" in record["preflight"]["data"]["problem"]
    assert all(record["steps"][step]["status"].startswith("skipped: no CIFAR-10 parquet")
               for step in ("pretrain", "probe", "finetune"))


def test_packages_that_do_not_import_stop_before_any_step(repo_root, tmp_path, carry):
    fake = tmp_path / "fake" / "datasets"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('datasets is not installed here')\n")
    code, output = gpu_check(repo_root, tmp_path, "--dry", CARRY=carry, PYTHONPATH=tmp_path / "fake")
    assert code == 2
    errors = [line for line in output.splitlines() if line.startswith("error: ")]
    assert errors == ["error: `import datasets` fails here (ImportError: datasets is not installed here). Carry its "
                      "wheels (scripts/build_gpu_carry.sh)."], output[-3000:]
    assert results(tmp_path)["steps"] == {}  # no step ran; what comes back says why
    assert "preflight failed: `import datasets` fails here" in (tmp_path / "out" / "summary.md").read_text()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: a GPU run would start for real")
def test_a_gpu_run_without_a_gpu_stops_at_once(repo_root, tmp_path, carry):
    code, output = gpu_check(repo_root, tmp_path, CARRY=carry)
    assert code == 2 and "error: torch sees no CUDA GPU" in output, output[-3000:]
    assert results(tmp_path)["steps"] == {}


def test_unknown_arguments_and_steps_are_refused(repo_root, tmp_path):
    code, output = gpu_check(repo_root, tmp_path, "--dyr")
    assert code == 2 and output.startswith("usage: ")
    code, output = gpu_check(repo_root, tmp_path, "--dry", STEPS="pipeline reproduce")
    assert code == 2 and "error: STEPS: unknown step reproduce" in output


def test_carry_builder_refuses_a_missing_source_before_touching_the_carry(repo_root, tmp_path):
    carry = tmp_path / "carry"
    carry.mkdir()
    (carry / "kept").write_text("an earlier carry")
    result = subprocess.run(["bash", "scripts/build_gpu_carry.sh"], cwd=repo_root, capture_output=True, text=True,
                            env=dict(os.environ, CARRY=str(carry), SOURCE=str(tmp_path / "missing")), timeout=60)
    assert result.returncode == 2 and result.stderr.startswith(f"error: no {tmp_path / 'missing'}/train.parquet")
    assert (carry / "kept").read_text() == "an earlier carry"

"""scripts/gpu_check.sh, the one script a lent GPU runs (issue 17): its dry mode runs every step on the CPU at tiny
sizes and writes every output file, and its preflight stops with one error, before any step, when something it
needs is missing (data, carried wheels, the GPU)."""

import json
import os
import shutil
import subprocess
import tarfile

import datasets
import pytest

OUTPUT_FILES = ("gpu.txt", "benchmark_model.txt", "benchmark_model.json", "benchmark_pipeline.txt",
                "benchmark_pipeline.json", "benchmark_vit_b.txt", "benchmark_vit_b.json", "benchmark_data.txt",
                "benchmark_data.json", "reproduce.txt", "comparison.md", "results.tar.gz")


def gpu_check(repo_root, tmp_path, *args, **environment):
    """(exit code, stdout, stderr) of `bash scripts/gpu_check.sh args` with OUT and RUNS under tmp_path."""
    env = dict(os.environ, OUT=str(tmp_path / "out"), RUNS=str(tmp_path / "runs"), OMP_NUM_THREADS="1",
               **{key: str(value) for key, value in environment.items()})
    result = subprocess.run(["bash", "scripts/gpu_check.sh", *args], cwd=repo_root, env=env, capture_output=True,
                            text=True, timeout=900)
    return result.returncode, result.stdout, result.stderr


def test_dry_run_makes_every_output_file(repo_root, tmp_path, parquet_folder):
    code, out, err = gpu_check(repo_root, tmp_path, "--dry", DATA=parquet_folder)
    assert code == 0, (out[-3000:], err[-3000:])
    assert "Traceback" not in out + err
    folder = tmp_path / "out"
    assert sorted(os.listdir(folder)) == sorted(OUTPUT_FILES)  # the files of a GPU run, and nothing else
    for name in OUTPUT_FILES:
        assert (folder / name).stat().st_size > 0, name
    for name in ("benchmark_model.json", "benchmark_pipeline.json", "benchmark_vit_b.json", "benchmark_data.json"):
        record = json.loads((folder / name).read_text())
        assert record["device"] == "cpu" and "scripts/benchmark.py" in record["command"], name
    vit_b = json.loads((folder / "benchmark_vit_b.json").read_text())
    # the ViT-B/16 file (tiny overrides on top in a dry run), reading a prepared folder from disk
    assert "configs/models/mae_vit_base_patch16.json" in vit_b["command"] and "--pipeline_prepared" in vit_b["command"]
    assert "pipeline / model-only" in (folder / "benchmark_vit_b.txt").read_text()
    assert "images / worker CPU-s" in (folder / "benchmark_data.txt").read_text()
    assert "all steps done" in (folder / "reproduce.txt").read_text()
    table = (folder / "comparison.md").read_text()
    for row in ("| Linear probe", "| Multi-block linear probe", "| Attentive probe", "| kNN, k = 5",
                "| Fine-tune, strong recipe"):
        assert row in table, row
    with tarfile.open(folder / "results.tar.gz") as archive:
        names = sorted(archive.getnames())
    assert len(names) == 10 and all(name.endswith("_results.json") for name in names)
    assert (tmp_path / "runs" / "reproduce_pretrain1_finetune1_dry" / "hub" / "README.md").is_file()  # the dry sizes
    for step in ("gpu", "benchmark_model", "benchmark_pipeline", "benchmark_vit_b", "benchmark_data", "reproduce"):
        assert f"[gpu_check] {step}: " in out, step


@pytest.fixture
def broken_packages(tmp_path):
    """A PYTHONPATH on which `import datasets` fails, as on the GPU machine."""
    fake = tmp_path / "fake" / "datasets"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('datasets is not installed here')\n")
    return str(tmp_path / "fake")


@pytest.mark.parametrize("case, message", [
    ("no data", "error: no CIFAR-10 copy at"),
    ("empty data folder", "train.parquet does not read as a parquet file"),
    ("not cifar", "expected CIFAR-10's training split (columns img and label)"),
    ("no wheels", "lacks the datasets/evaluate packages and"),
    ("empty wheels folder", "holds no datasets-*.whl and evaluate-*.whl"),
])
def test_preflight_stops_before_any_step(repo_root, tmp_path, parquet_folder, broken_packages, case, message):
    data, environment = parquet_folder, {}
    if case == "no data":
        data = tmp_path / "missing"
    elif case == "empty data folder":
        data = tmp_path / "empty"
        data.mkdir()
    elif case == "not cifar":
        data = tmp_path / "other"
        data.mkdir()
        datasets.Dataset.from_dict({"text": ["a", "b"]}).to_parquet(str(data / "train.parquet"))
    else:
        environment = {"PYTHONPATH": broken_packages, "WHEELS": tmp_path / "wheels"}
        if case == "empty wheels folder":
            (tmp_path / "wheels").mkdir()
    code, out, err = gpu_check(repo_root, tmp_path, "--dry", DATA=data, **environment)
    assert code == 2, (out, err)
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and message in errors[0], err
    assert os.listdir(tmp_path / "out") == [] and not (tmp_path / "runs").exists()  # no step ran


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="a GPU is here: a GPU run would start for real")
def test_a_gpu_run_without_a_gpu_stops_at_once(repo_root, tmp_path, parquet_folder):
    code, _, err = gpu_check(repo_root, tmp_path, DATA=parquet_folder)
    assert code == 2 and "error: nvidia-smi is missing: no GPU here. Check on a CPU with DRY=1." in err, err
    assert os.listdir(tmp_path / "out") == []


def test_unknown_arguments_are_refused(repo_root, tmp_path):
    code, _, err = gpu_check(repo_root, tmp_path, "--dyr")
    assert code == 2 and err.startswith("usage: ")

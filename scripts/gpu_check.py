"""The Python half of scripts/gpu_check.sh: the carried wheels' install, the preflight and the result files.

    python scripts/gpu_check.py --install gpu_carry/wheels --site /tmp/gpu_check_site

gpu_check.sh calls it four ways (the folders are its $OUT and $RUNS):
    --install WHEELS --site DIR      pip install --no-index --no-deps into DIR the carried wheels whose package this
                                     Python lacks or has in an older version
    --preflight --out OUT --runs RUNS --data DATA [--dry] --vit_b_workers N --vit_b_batch B
                                     packages, GPU, compiler + compile smoke test, data, /dev/shm; its decisions go to
                                     RUNS/plan.sh for the shell (exit code 2: nothing can run)
    --record STEP --status S --seconds N --cap N --step_command C --out OUT --runs RUNS
                                     a step's status, time and figures (read from its result files under RUNS)
    --finish --out OUT --runs RUNS   results.tar.gz: the result JSON files of the runs

OUT receives four files, rewritten as each step ends (a run stopped half-way still leaves what it measured):
summary.md (a table of the steps, their status and figures), results.json (the same, every figure), log.txt (written
by gpu_check.sh) and results.tar.gz. Nothing else goes there: only what comes back from the GPU machine belongs.
It imports no mae_hf before the carried wheels are installed (an old transformers there would break it).
"""

import argparse
import importlib
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time

# step -> what it proves; RESULT_FILES: the files (under RUNS) its figures are read from
STEPS = {
    "pipeline": "the default CIFAR-10 pretraining pipeline against the model-only step (bf16, compile)",
    "model": "mae_hf against transformers' ViTMAE, one train step",
    "pretrain": "a short real pretraining on CIFAR-10",
    "probe": "linear probe + kNN of that encoder",
    "finetune": "a short fine-tune of it, strong recipe",
    "vit_b": "ViT-B/16 at 224 px: the pipeline reading a prepared folder from disk",
}
RESULT_FILES = {
    "pipeline": ["benchmark_pipeline.json"], "model": ["benchmark_model.json"], "vit_b": ["benchmark_vit_b.json"],
    "pretrain": ["pretrain/pretraining_summary.json"],
    "probe": ["probe/linear_probe_results.json", "probe/knn_results.json"],
    "finetune": ["finetune/finetune_results.json"],
}
REQUIRED = ("torch", "transformers", "datasets", "evaluate", "accelerate")  # must import, at pyproject's versions
VERSIONS = (*REQUIRED, "huggingface-hub", "tokenizers", "safetensors", "pyarrow", "fsspec", "pandas", "numpy", "dill",
            "multiprocess", "regex", "triton")


def read_json(path: str):
    try:
        with open(path) as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return None


def load_results(out: str) -> dict:
    return read_json(os.path.join(out, "results.json")) or {"preflight": {}, "steps": {}}


def save_results(out: str, results: dict) -> None:
    """results.json and summary.md, each written whole to a temporary name and renamed (never half a file)."""
    for name, text in (("results.json", json.dumps(results, indent=2)), ("summary.md", summary(results))):
        path = os.path.join(out, name)
        with open(path + ".tmp", "w") as handle:
            handle.write(text + "\n")
        os.replace(path + ".tmp", path)


def installed_version(name: str):
    from packaging.version import Version

    try:
        return Version(importlib.metadata.version(name))
    except importlib.metadata.PackageNotFoundError:
        return None


def install(args) -> int:
    """pip install --no-index --no-deps into --site each carried wheel (of --install) whose package this Python lacks
    or has in an older version; the others are left (the machine's own are newer or the same)."""
    from packaging.utils import parse_wheel_filename

    wheels, target = args.install, args.site
    chosen, kept = [], []
    for wheel in sorted(os.listdir(wheels)) if os.path.isdir(wheels) else []:
        if not wheel.endswith(".whl"):
            continue
        name, version, _, _ = parse_wheel_filename(wheel)
        have = installed_version(name)
        (chosen if have is None or have < version else kept).append((wheel, name, version, have))
    for wheel, name, version, have in kept:
        print(f"[gpu_check] {name} {have} here (carried: {version}): kept")
    if not chosen:
        return 0
    for wheel, name, version, have in chosen:
        print(f"[gpu_check] {name} {version}: installing the carried wheel ({have or 'absent'} here)")
    command = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
               "--no-cache-dir", "--upgrade", "--target", target, *(os.path.join(wheels, w[0]) for w in chosen)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        print(f"error: installing the carried wheels failed: {' '.join(result.stderr.split()[-40:])}", file=sys.stderr)
        return 2
    return 0


def check_packages(notes: list) -> str | None:
    """None when torch, transformers (at this project's minimum), datasets, evaluate and this checkout's mae_hf
    import; else the error."""
    import tomllib
    from packaging.requirements import Requirement

    with open("pyproject.toml", "rb") as handle:
        dependencies = tomllib.load(handle)["project"]["dependencies"]

    for module in (*REQUIRED, "mae_hf"):
        try:
            where = importlib.import_module(module).__file__
        except Exception as error:
            return (f"`import {module}` fails here ({type(error).__name__}: {' '.join(str(error).split())}). Carry "
                    "its wheels (scripts/build_gpu_carry.sh).")
        if module == "mae_hf" and os.path.dirname(where) != os.path.abspath("mae_hf"):
            return f"mae_hf imports from {where}, not this checkout's: run from the repository root."
    for line in dependencies:
        requirement = Requirement(line)
        have = installed_version(requirement.name)
        if requirement.name in REQUIRED and have is not None and \
                not requirement.specifier.contains(have, prereleases=True):
            if requirement.name == "torch":  # pyproject's bound says what is tested; older may still work
                notes.append(f"torch {have} is outside pyproject's tested range {requirement.specifier}")
                continue
            return (f"{requirement.name} {have} here, this project needs {requirement.specifier}: carry its wheel "
                    "(scripts/build_gpu_carry.sh).")
    return None


def check_data(folder: str) -> tuple[str | None, int]:
    """(None, rows) when folder/train.parquet is CIFAR-10's training split; else (the problem, 0)."""
    import pyarrow.parquet as parquet

    try:
        table = parquet.ParquetFile(os.path.join(folder, "train.parquet"))
    except Exception as error:
        return (f"{folder}/train.parquet does not read as a parquet file ({type(error).__name__}: {error}); carry "
                "the CIFAR-10 training split there (scripts/build_gpu_carry.sh)."), 0
    names, rows = table.schema_arrow.names, table.metadata.num_rows
    if rows == 0 or not {"img", "image"} & set(names) or "label" not in names:
        return (f"{folder}/train.parquet holds {rows} rows with columns {names}; expected CIFAR-10's training split "
                "(columns img and label)."), 0
    return None, rows


def compile_smoke_test(device: str, seconds: int, backend: str) -> str | None:
    """None when a one-line torch.compile runs on `device` within `seconds`; else what went wrong."""
    code = ("import torch; x = torch.ones(8, device=%r); f = torch.compile(lambda t: (t * 2).sin() + 1, backend=%r); "
            "assert torch.allclose(f(x), (x * 2).sin() + 1)" % (device, backend))
    try:
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=seconds)
    except subprocess.TimeoutExpired:
        return f"a one-line torch.compile took over {seconds} s"
    if result.returncode != 0:
        lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
        return "a one-line torch.compile failed: " + (lines[-1] if lines else f"exit code {result.returncode}")
    return None


def plan_workers(workers: int, batch: int, canvas: tuple, free: int | None) -> tuple[int, str]:
    """DataLoader workers for the ViT-B step whose batches fit /dev/shm (the benchmark's only loader: training's),
    by the same rule the training scripts use; and what was decided, said."""
    import math

    from mae_hf.data.streaming import fit_workers_to_shared_memory, shared_memory_free

    free = shared_memory_free() if free is None else free
    batch_bytes = batch * math.prod(canvas)
    try:
        fitted, _ = fit_workers_to_shared_memory(workers, 2, batch_bytes, chosen=False, free=free, processes=1)
    except ValueError as error:
        return 0, f"/dev/shm too small even for one worker ({error}); the step reads with 0 workers"
    free_text = "unknown" if free is None else f"{free / 2**20:,.0f} MB"
    if fitted < workers:
        return fitted, (f"/dev/shm has {free_text} free: {fitted} worker(s) instead of {workers} "
                        f"(batches of {batch_bytes / 2**20:,.0f} MB)")
    return workers, f"/dev/shm has {free_text} free: {workers} worker(s) fit"


def preflight(args) -> int:
    started = time.perf_counter()
    notes, plan = [], {}
    results = {"mode": "dry run on the CPU, tiny sizes" if args.dry else "GPU run",
               "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "preflight": {}, "steps": {}}
    record = results["preflight"]
    record["versions"] = {name: str(installed_version(name) or "absent") for name in VERSIONS}
    record["python"] = sys.version.split()[0]
    record["installed_from_carry"] = sorted(name.removesuffix(".dist-info") for name in
                                            (os.listdir(args.site) if args.site and os.path.isdir(args.site) else [])
                                            if name.endswith(".dist-info"))
    problem = check_packages(notes)
    device = "cpu" if args.dry else "cuda"
    if problem is None and not args.dry:
        result = subprocess.run([sys.executable, "-c", "import torch; assert torch.cuda.is_available(), 'none'; "
                                 "p = torch.cuda.get_device_properties(0); "
                                 "print(f'{p.name}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs')"],
                                capture_output=True, text=True)
        if result.returncode != 0:
            problem = "torch sees no CUDA GPU (torch.cuda.is_available() is False). Check on a CPU with DRY=1."
        else:
            record["gpu"] = result.stdout.strip()
    if problem is None:
        record["gpu"] = record.get("gpu", f"none: dry run on the CPU ({os.cpu_count()} cores)")
        cc = os.environ.get("CC")  # the C compiler Triton (and inductor) will call: $CC, else cc, gcc or clang
        compiler = shutil.which(cc) if cc else next(filter(None, map(shutil.which, ("cc", "gcc", "clang"))), None)
        why = ("no C compiler (" + (f"CC={cc} not found" if cc else "no cc, gcc or clang on PATH")
               + "): Triton cannot build its kernels"
               if compiler is None else compile_smoke_test(device, args.compile_seconds, args.compile_backend))
        plan["COMPILE"] = int(why is None)
        ran = f"{compiler} found and a one-line torch.compile ({args.compile_backend}) ran on {device}"
        dry = " (a dry run's steps run eager all the same)" if args.dry else ""
        record["compile"] = {"on": why is None, "compiler": compiler, "why": why or ran + dry}
        if why is not None:
            notes.append(f"torch.compile off for every step: {why}")
        data_problem, rows = check_data(args.data)
        record["data"] = {"folder": args.data, "images": rows, "problem": data_problem}
        plan["DATA_OK"] = int(data_problem is None)
        if data_problem is not None:
            notes.append(f"the CIFAR-10 steps (pretrain, probe, finetune) are skipped: {data_problem}")
        from mae_hf.benchmark_data import ASPECTS

        canvas = (3, max(h for h, _ in ASPECTS), max(w for _, w in ASPECTS))  # the synthetic prepared folder's
        free = int(args.shm_free_mb * 2**20) if args.shm_free_mb is not None else None
        plan["VIT_B_WORKERS"], said = plan_workers(args.vit_b_workers, args.vit_b_batch, canvas, free)
        record["shared_memory"] = {"workers_asked": args.vit_b_workers, "workers": plan["VIT_B_WORKERS"], "why": said}
        if plan["VIT_B_WORKERS"] < args.vit_b_workers:
            notes.append(f"ViT-B step: {said}")
    record.update(status="ok" if problem is None else "failed", problem=problem, notes=notes,
                  seconds=round(time.perf_counter() - started, 1))
    os.makedirs(args.runs, exist_ok=True)
    with open(os.path.join(args.runs, "plan.sh"), "w") as handle:
        handle.writelines(f"{key}={value}\n" for key, value in plan.items())
    save_results(args.out, results)
    for note in notes:
        print(f"[gpu_check] note: {note}")
    print("[gpu_check] versions: " + ", ".join(f"{k} {v}" for k, v in record["versions"].items()))
    if problem is not None:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    return 0


def figures(step: str, runs: str) -> dict:
    """The figures a step's result files hold, by name (what summary.md shows)."""
    files = [read_json(os.path.join(runs, name)) for name in RESULT_FILES[step]]
    if any(record is None for record in files):
        return {}
    if step in ("pipeline", "vit_b"):
        record = files[0]
        found = {"images_per_s_pipeline": record["median_images_per_s"]["pipeline"],
                 "images_per_s_model_only": record["median_images_per_s"]["model_only"],
                 "pipeline_over_model_only": record["ratio_pipeline_over_model_only"],
                 "dtype": record["dtype"], "compile": record["compile"], "batch_size": record["batch_size"],
                 "data_workers": record.get("data_workers")}
        if record.get("sync_debug"):
            sync = record["sync_debug"]
            found.update(sync_warnings=sync["warnings"], sync_debug_steps=sync["steps"], sync_places=sync["places"])
        return found
    if step == "model":
        results = files[0]["results"]
        found = {key: files[0][key] for key in ("dtype", "compile", "batch_size")}
        for key, result in results.items():
            name = result["model"]
            found[f"{name}_images_per_s"] = result["images_per_s"]
            found[f"{name}_cuda_peak_mb"] = result["cuda_peak_mb"]
            if result.get("compile_seconds") is not None:
                found[f"{name}_compile_seconds"] = result["compile_seconds"]
        found["mae_hf_over_vit_mae"] = next(r["over_vit_mae"] for r in results.values() if r["model"] == "mae_hf")
        return found
    if step == "pretrain":
        keys = ("epochs", "steps", "train_samples", "global_batch_size", "bf16", "torch_compile", "device",
                "train_runtime_seconds", "pipeline_images_per_second", "eval_loss", "eval_knn_accuracy")
        return {key: files[0].get(key) for key in keys}
    if step == "probe":
        linear, knn = files
        return {"linear_probe_accuracy": linear.get("eval_accuracy"), "knn_accuracy": knn.get("eval_accuracy"),
                "knn_k": knn.get("knn_k"), "feature_seconds": linear.get("feature_seconds"),
                "probe_seconds": linear.get("probe_seconds"), "eval_samples": linear.get("eval_samples")}
    keys = ("eval_accuracy", "eval_ema_accuracy", "epochs", "steps", "global_batch_size", "precision", "eval_samples")
    return {key: files[0].get(key) for key in keys}


def shown(value) -> str:
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"
    if isinstance(value, dict):
        return "; ".join(f"{count} x {place}" for place, count in value.items()) or "none"
    return str(value)


def summary(results: dict) -> str:
    preflight = results.get("preflight", {})
    lines = [f"# scripts/gpu_check.sh: {results.get('mode', '')}", "",
             f"Started {results.get('started', '?')}; GPU: {preflight.get('gpu', '?')}; python "
             f"{preflight.get('python', '?')}; " + ", ".join(f"{k} {v}" for k, v in
                                                           preflight.get("versions", {}).items()), ""]
    compile_record = preflight.get("compile")
    if compile_record:
        lines.append(f"- torch.compile {'on' if compile_record['on'] else 'OFF'}: {compile_record['why']}")
    if preflight.get("shared_memory"):
        lines.append(f"- ViT-B step workers: {preflight['shared_memory']['why']}")
    lines += [f"- note: {note}" for note in preflight.get("notes", [])]
    if preflight.get("problem"):
        lines.append(f"- preflight failed: {preflight['problem']}")
    lines += ["", "| step | what it proves | status | seconds (cap) | figures |", "|---|---|---|---:|---|",
              f"| preflight | packages, GPU, compiler, data, /dev/shm | {preflight.get('status', '?')} | "
              f"{preflight.get('seconds', '')} | |"]
    for step, record in results.get("steps", {}).items():
        found = "; ".join(f"{key} {shown(value)}" for key, value in record.get("figures", {}).items())
        lines.append(f"| {step} | {STEPS.get(step, '')} | {record['status']} | {record['seconds']} "
                     f"({record['cap_seconds']}) | {found} |")
    lines += ["", "Commands:", ""] + [f"- {step}: `{record['command']}`" for step, record in
                                      results.get("steps", {}).items() if record.get("command")]
    return "\n".join(lines)


def record_step(args) -> int:
    results = load_results(args.out)
    step = args.record
    record = {"status": args.status, "seconds": args.seconds, "cap_seconds": args.cap, "command": args.step_command,
              "figures": figures(step, args.runs) if args.status == "ok" else {}}
    if args.status == "ok" and not record["figures"]:
        record["status"] = f"ok, but {', '.join(RESULT_FILES[step])} missing"
    results["steps"][step] = record
    save_results(args.out, results)
    print(f"[gpu_check] {step}: {record['status']} in {args.seconds} s (cap {args.cap} s)"
          + "".join(f"\n    {key}: {shown(value)}" for key, value in record["figures"].items()))
    return 0


def finish(args) -> int:
    """results.tar.gz: every result JSON of the runs (benchmarks, summaries, results, trainer states)."""
    names = []
    for folder, _, files in os.walk(args.runs):
        parts = os.path.relpath(folder, args.runs).split(os.sep)
        if parts[0] in ("data", "site") or any(re.fullmatch(r"checkpoint-\d+", part) for part in parts):
            continue  # the synthetic images, the installed wheels, the checkpoints' copies
        names += [os.path.join(folder, name) for name in files
                  if name.endswith(".json") and name not in ("config.json", "preprocessor_config.json")]
    with tarfile.open(os.path.join(args.out, "results.tar.gz"), "w:gz") as archive:
        for name in sorted(names):
            archive.add(name, arcname=os.path.relpath(name, args.runs))
    results = load_results(args.out)
    results["finished"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    results["archive"] = sorted(os.path.relpath(name, args.runs) for name in names)
    save_results(args.out, results)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    actions = parser.add_mutually_exclusive_group(required=True)
    actions.add_argument("--install", metavar="WHEELS", help="Install the carried wheels of this folder (see above).")
    actions.add_argument("--preflight", action="store_true", help="Check and plan before the steps (see above).")
    actions.add_argument("--record", metavar="STEP", choices=list(STEPS), help="Record a step that ended.")
    actions.add_argument("--finish", action="store_true", help="Write results.tar.gz.")
    parser.add_argument("--site", help="--install: the folder the wheels go to (put first on PYTHONPATH after).")
    parser.add_argument("--out", help="Where the files that come back go (gpu_check.sh's $OUT).")
    parser.add_argument("--runs", help="Where the runs write (gpu_check.sh's $RUNS).")
    parser.add_argument("--data", help="--preflight: the CIFAR-10 folder (train.parquet).")
    parser.add_argument("--dry", action="store_true", help="--preflight: a dry run on the CPU (no GPU looked for).")
    parser.add_argument("--vit_b_workers", type=int, default=12, help="--preflight: the ViT-B step's workers wished.")
    parser.add_argument("--vit_b_batch", type=int, default=256, help="--preflight: the ViT-B step's batch size.")
    parser.add_argument("--compile_seconds", type=int, default=90, help="--preflight: time for the compile test.")
    parser.add_argument("--compile_backend", default="inductor",
                        help="--preflight: torch.compile backend of the smoke test (inductor: the steps'; a dry run on "
                             "the CPU takes aot_eager, which needs no minute of C++ compiling).")
    parser.add_argument("--shm_free_mb", type=float, help="--preflight: take /dev/shm to have this much free.")
    parser.add_argument("--status", help="--record: ok, failed (exit code N), stopped at its cap, skipped: why.")
    parser.add_argument("--seconds", type=int, default=0, help="--record: the step's wall time.")
    parser.add_argument("--cap", type=int, default=0, help="--record: the step's time cap.")
    parser.add_argument("--step_command", default="", help="--record: the step's command line, as shown.")
    args = parser.parse_args(argv)
    needed = {"install": ["site"], "preflight": ["out", "runs", "data"], "record": ["out", "runs", "status"],
              "finish": ["out", "runs"]}
    action = next(name for name in needed if getattr(args, name))
    missing = [f"--{name}" for name in needed[action] if getattr(args, name) is None]
    if missing:
        parser.error(f"--{action} needs {', '.join(missing)}.")
    return {"install": install, "preflight": preflight, "record": record_step, "finish": finish}[action](args)


if __name__ == "__main__":
    sys.exit(main())

"""The documentation against the code: every documented command parses with its script's parser (tests/docs_commands.py
says what is checked), the CPU quick start runs end to end at tiny scale, links resolve, every guide is linked from
the README, every --help starts with what the script does and an example, and no user-facing text names an internal
issue number. The negative tests show that the check fails on a broken command and on a flag renamed in a parser."""

import ast
import contextlib
import dataclasses
import io
import json
import os
import re
import subprocess
from pathlib import Path

import pytest
from docs_commands import (
    ROOT,
    SHELL_LANGUAGES,
    check_command,
    commands_of_shell,
    docstring,
    documented_commands,
    fenced_blocks,
    help_text,
    load,
    markdown_files,
    project_scripts,
    relative,
    scripts_run,
)
from fixtures_runs import TINY_MODEL

COMMANDS = documented_commands()
README = ROOT / "README.md"
README_MAX_LINES = 200
# Linked before the file exists: written on another branch, checked like every other link once it is here.
PENDING_LINKS = {"docs/cpu_speed.md"}
ISSUE_NUMBER = re.compile(r"\bissues?\s*#?\d+|#\d+\b", re.IGNORECASE)


@pytest.fixture(scope="module")
def docs_cwd(tmp_path_factory):
    """An empty working folder holding only `configs` (a link to the repository's): documented commands name config
    files relative to the repository root, and nothing a command reads or writes lands in the checkout."""
    folder = tmp_path_factory.mktemp("docs_cwd")
    for name in ("configs", "demo"):  # config files; the demo's example images, which snippets open
        (folder / name).symlink_to(ROOT / name, target_is_directory=True)
    previous = os.getcwd()
    os.chdir(folder)
    yield folder
    os.chdir(previous)


@pytest.mark.parametrize("command", COMMANDS, ids=[command.source for command in COMMANDS])
def test_documented_command_parses(command, docs_cwd, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    try:
        check_command(command)
    except ValueError as error:
        pytest.fail(f"{command}\n{error}")


def test_the_docs_run_every_script():
    """Each script has at least one documented command in README.md or docs/ (not only in its own --help)."""
    in_guides = [command for command in COMMANDS if command.source.startswith(("README.md", "docs/"))]
    assert set(project_scripts()) - scripts_run(in_guides) == set()


def test_commands_are_in_shell_blocks():
    """A command in an unlabelled or text block would escape the check above."""
    starts = re.compile(r"^\s*(\$ )?(python3? (scripts|demo)/|torchrun |accelerate launch |pip install |bash scripts/)")
    blocks = [block for path in markdown_files() for block in fenced_blocks(path.read_text(), relative(path))]
    misplaced = [block.source for block in blocks if block.language not in SHELL_LANGUAGES
                 and any(starts.match(line) for line in block.text.splitlines())]
    assert misplaced == [], "commands outside ```bash blocks"


def test_python_blocks_compile():
    for path in markdown_files():
        for block in fenced_blocks(path.read_text(), relative(path)):
            if block.language == "python":
                compile(block.text, block.source, "exec")


def links(path: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.DOTALL)  # not inside code blocks
    return [target for target in re.findall(r"\]\(([^)\s]+)\)", text) if not re.match(r"^[a-z]+:", target)]


def test_links_resolve():
    broken = []
    for path in markdown_files():
        for target in links(path):
            file = (path.parent / target.split("#")[0]).resolve()
            if not file.exists() and relative(file) not in PENDING_LINKS:
                broken.append(f"{relative(path)} -> {target}")
    assert broken == []


def test_readme_links_every_guide_and_is_short():
    linked = {relative((ROOT / target.split("#")[0]).resolve()) for target in links(README)}
    guides = {relative(path) for path in markdown_files()[1:]}
    assert guides - linked == set(), "guides the README does not link"
    assert PENDING_LINKS <= linked
    assert len(README.read_text().splitlines()) <= README_MAX_LINES


def run_help(script: str) -> str:
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), pytest.raises(SystemExit) as exit:
        load(script).main(["--help"])
    assert exit.value.code in (0, None)
    return printed.getvalue()


@pytest.mark.parametrize("script", project_scripts())
def test_help_starts_with_what_the_script_does_and_an_example(script):
    """After the usage line: one line saying what the script does, then (after a blank line) an example command of
    this very script. The example itself is checked with the other documented commands."""
    printed = run_help(script)
    description = printed.split("\n\n", 1)[1]  # argparse: usage, a blank line, the description
    summary, rest = description.split("\n", 1)
    assert summary.strip() and len(summary) <= 120 and summary.rstrip().endswith("."), summary
    assert rest.startswith("\n"), f"the summary is one line, then a blank line: {description[:300]!r}"
    example = rest.lstrip("\n").splitlines()[0].strip()
    runner = "python app.py" if script == "demo/app.py" else f"python {script}"
    assert example.startswith((f"python {script}", runner)) or re.match(rf"^[A-Z_]+=\S+ python {script}", example), \
        example
    assert help_text(script).strip().splitlines()[0] == summary.strip(), "the description is the module docstring"
    assert not ISSUE_NUMBER.search(printed), "internal issue numbers in --help"


@pytest.mark.parametrize("script", [*project_scripts(), "mae_hf/benchmark.py"])
def test_help_keeps_the_line_breaks_of_its_examples(script):
    """A continued example command (a line ending in `\\`) shows in --help as written: in a docstring that is not
    raw, backslash-newline joins the lines into one."""
    source = (ROOT / script).read_text()
    node = ast.parse(source).body[0]
    if not (isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)):
        return  # no docstring (a shell script or an app without one): nothing to keep
    written = ast.get_source_segment(source, node)
    assert written.count("\\\n") == node.value.value.count("\\\n"), f"{script}: make the docstring raw (r\"\"\"...)"


def test_gpu_check_help_runs_nothing(tmp_path):
    result = subprocess.run(["bash", str(ROOT / "scripts/gpu_check.sh"), "--help"], capture_output=True, text=True,
                            cwd=tmp_path, timeout=60)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].endswith(".") and lines[2].strip().startswith("bash scripts/gpu_check.sh"), result.stdout[:300]
    assert list(tmp_path.iterdir()) == []  # no gpu_check/ output folder: nothing ran
    assert check_command(commands_of_shell(lines[2], "gpu_check.sh --help", 3)[0]) is None


def user_facing_files() -> list[Path]:
    configs = sorted(path for path in (ROOT / "configs").rglob("*") if path.is_file())  # presets and model files
    return markdown_files() + configs + [ROOT / "model_card.md", ROOT / "scripts/gpu_check.sh"]


def test_user_facing_text_names_no_issue_numbers():
    found = [f"{relative(path)}: {match[0]}" for path in user_facing_files()
             for match in ISSUE_NUMBER.finditer(path.read_text())]
    found += [f"{path} docstring: {match[0]}" for path in project_scripts() + ["mae_hf/benchmark.py"]
              for match in ISSUE_NUMBER.finditer(docstring(path))]
    assert found == []


TIMES_TABLE = ("docs/benchmarks.md", "## How long the documented CPU runs take")
DURATION = re.compile(r"(\d[\d,.]*(?:\s*[–-]\s*\d[\d,.]*)?)\s*(?:s|min|minutes|hours)\b(?!/)")


def test_every_stated_time_comes_from_the_measured_table():
    """The times the README, the config files and evaluation.md state are all in one measured table (with its
    machine and load), so that they cannot disagree with each other or with the runs behind them."""
    path, heading = TIMES_TABLE
    table = (ROOT / path).read_text().split(heading, 1)[1].split("\n## ", 1)[0]
    measured = set(re.findall(r"\d[\d,.]*", table))
    stated = [(relative(file), match.group(0)) for file in [README, ROOT / "docs" / "evaluation.md",
                                                             *sorted((ROOT / "configs").glob("*.yaml"))]
              for match in DURATION.finditer(file.read_text())]
    assert len(stated) >= 4
    unmeasured = [(file, text) for file, text in stated
                  if not set(re.findall(r"\d[\d,.]*", text)) <= measured]
    assert unmeasured == []


# --- the CPU quick start, end to end at tiny scale ------------------------------------------------------------

QUICK_START = "## Quick start on a CPU"
TINY_FLAGS = {  # appended to the documented command: later flags win, so the documented ones are all parsed and used
    "scripts/pretrain.py": ["--config_overrides", ",".join(f"{k}={v}" for k, v in TINY_MODEL.items()),
                            "--num_train_epochs", "1", "--per_device_train_batch_size", "16",
                            "--per_device_eval_batch_size", "16", "--knn_max_train_samples", "32",
                            "--disable_tqdm", "true"],
    "scripts/linear_probe.py": ["--probe_epochs", "2", "--knn_k", "5", "--feature_batch_size", "16",
                                "--disable_tqdm", "true"],
    "scripts/finetune.py": ["--num_train_epochs", "1", "--per_device_train_batch_size", "16", "--disable_tqdm",
                            "true"],
}


def quick_start_block(text: str):
    section = text.split(QUICK_START, 1)
    assert len(section) == 2, f"README.md has no section {QUICK_START!r}"
    blocks = [block for block in fenced_blocks(section[1].split("\n## ", 1)[0], "README.md")
              if block.language in SHELL_LANGUAGES]
    assert blocks, f"no shell block under {QUICK_START!r}"
    offset = text[:text.index(QUICK_START)].count("\n")
    return blocks[0], offset


@pytest.fixture(scope="module")
def quick_start(parquet_folder, docs_cwd):
    """The README's CPU quick start run in `docs_cwd`, command by command as written, on a tiny dataset (the block's
    `D`) with tiny model sizes and one epoch appended: [(script, argv, what it printed)]."""
    block, offset = quick_start_block(README.read_text())
    commands = commands_of_shell(block.text, "README.md", block.first_line + offset,
                                 overrides={"D": str(parquet_folder)})
    ran = []
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        for command in commands:
            script, argv = command.words[1], command.words[2:]
            assert command.words[0] == "python" and script in project_scripts(), f"not a script of ours: {command}"
            printed = io.StringIO()
            with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
                load(script).main(argv + TINY_FLAGS.get(script, []))
            ran.append((script, argv, printed.getvalue()))
    return ran


def test_cpu_quick_start_runs_end_to_end(quick_start, parquet_folder, docs_cwd):
    """Every step of the quick start leaves its results."""
    ran = quick_start
    assert {"scripts/pretrain.py", "scripts/linear_probe.py"} <= {script for script, _, _ in ran}
    for script, argv, printed in ran:
        if script == "scripts/pretrain.py":
            summary = json.loads((docs_cwd / argv[argv.index("--output_dir") + 1] / "pretraining_summary.json")
                                 .read_text())
            assert summary["dataset_name"] == str(parquet_folder) and summary["steps"] >= 1
        if script == "scripts/linear_probe.py":
            results = docs_cwd / argv[argv.index("--output_dir") + 1] / "linear_probe_results.json"
            assert 0 <= json.loads(results.read_text())["eval_accuracy"] <= 1
        if script == "scripts/compare.py":
            assert "| Linear probe" in printed
        if script == "scripts/visualize.py":
            assert (docs_cwd / argv[argv.index("--output") + 1]).is_file()


def run_python_blocks(path: Path) -> tuple[dict, str]:
    """Every Python block of a guide, in order and in one namespace, in the current folder: (namespace, printed)."""
    blocks = [block for block in fenced_blocks(path.read_text(), relative(path)) if block.language == "python"]
    assert blocks, f"{relative(path)} has no Python block"
    namespace = {"__name__": "__main__"}
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        for block in blocks:
            exec(compile(block.text, block.source, "exec"), namespace)
    return namespace, printed.getvalue()


def test_readme_python_runs_as_pasted_after_the_quick_start(quick_start, docs_cwd, monkeypatch):
    """The README's Python, in the folder where the quick start ran (as a user pastes it after the quick start's
    commands): it must run, with nothing defined beforehand."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    namespace, printed = run_python_blocks(README)
    assert tuple(namespace["features"].shape) == (1, TINY_MODEL["hidden_size"])
    assert printed.strip() in {"cat", "dog", "ship"}  # the tiny dataset's classes


def test_models_guide_python_runs_as_pasted(quick_start, docs_cwd, monkeypatch):
    """docs/models.md's Python blocks, one after the other, after the quick start (its probe folder has the trained
    head the classification pipeline needs)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    namespace, _ = run_python_blocks(ROOT / "docs" / "models.md")
    assert namespace["features"].shape == (5, 192)  # the exported encoder's, on 5 images
    assert type(namespace["theirs"]).__name__ == "ViTMAEForPreTraining"


# --- the check itself fails on broken commands ------------------------------------------------------------------

BROKEN = [  # (documented text, what the error says)
    ("python scripts/pretrain.py --num_train_epoch 3 --output_dir x", "no option --num_train_epoch"),  # a prefix
    ("python scripts/pretrain.py --output_directory x", "no option --output_directory"),
    ("python scripts/pretrain.py --probe_epochs 3 --output_dir x", "no option --probe_epochs"),  # another script's
    ("python scripts/linear_probe.py --probe_epochs many --output_dir x", "invalid int value"),
    ("python scripts/finetune.py --augment_policy autoaugment --output_dir x", "--augment_policy must be"),
    ("python scripts/pretrain.py configs/cpu_small.yaml", "--output_dir is required"),
    ("python scripts/pretrain.py configs/missing.yaml --output_dir x", "configs/missing.yaml does not exist"),
    ("python scripts/pretrian.py --output_dir x", "scripts/pretrian.py does not exist"),
    ("python scripts/compare.py", "the following arguments are required"),
    ("python scripts/benchmark.py --suite everything", "invalid choice"),
    ("python scripts/publish.py runs/mae --output_dir runs/hub [--space true]", "does not accept"),
    ("torchrun --nproc_per_nodes 4 scripts/pretrain.py --output_dir x", "torchrun has no option"),
    ("accelerate launch --num_processes 2 scripts/pretrain.py --output_dirr x", "no option --output_dirr"),
    ("python scripts/reproduce.py --output_dir x --pretrain_args '--num_train_epoch 3'", "no option --num_train_epoch"),
    ("OMP_NUM_THREADS=1 nice -n 10 python scripts/knn.py --k 20 --output_dir x", "no option --k"),
    ("MAE_MODEL=user/m python demo/app.py --model_dir x", "no option --model_dir"),
    ("bash scripts/gpu_check.bash", "does not exist"),
    ("python -c 'import mae_hf; mae_hf..MAEConfig()'", "invalid syntax"),
    ("D=data\npython scripts/pretrain.py \\\n    --dataset_name $D --output_dri runs/x", "no option --output_dri"),
]


@pytest.mark.parametrize("text, error", BROKEN, ids=[text.split("\n")[-1][:60] for text, _ in BROKEN])
def test_the_check_fails_on_a_broken_command(text, error, docs_cwd):
    commands = commands_of_shell(text, "broken", 1)
    assert len(commands) == 1
    with pytest.raises((ValueError, SyntaxError), match=re.escape(error)):
        check_command(commands[0])


def test_a_flag_renamed_in_the_readme_fails(docs_cwd):
    """The README's quick start with one flag renamed: that command, and only that one, fails."""
    text = README.read_text()
    block, offset = quick_start_block(text)
    broken = block.text.replace("--model_name_or_path", "--model_path", 1)
    assert broken != block.text
    commands = commands_of_shell(broken, "README.md", block.first_line + offset)
    failures = []
    for command in commands:
        try:
            check_command(command)
        except ValueError as error:
            failures.append(str(error))
    assert failures == ["scripts/linear_probe.py has no option --model_path"]


def test_a_flag_renamed_in_a_parser_fails(docs_cwd, monkeypatch):
    """Rename linear_probe.py's --feature_blocks in its parser: every documented command using it fails."""
    module = load("scripts/linear_probe.py")
    original = module.FrozenEvalArguments
    fields = [("blocks_of_features" if f.name == "feature_blocks" else f.name, f.type,
               dataclasses.field(default=f.default, default_factory=f.default_factory, metadata=f.metadata))
              for f in dataclasses.fields(original)]
    renamed = dataclasses.make_dataclass("FrozenEvalArguments", fields)
    using = [command for command in COMMANDS if "--feature_blocks" in command.words
             and "scripts/linear_probe.py" in command.words[:3]]
    assert len(using) >= 3
    for command in using:
        check_command(command)
    monkeypatch.setattr(module, "FrozenEvalArguments", renamed)
    for command in using:
        with pytest.raises(ValueError, match="no option --feature_blocks"):
            check_command(command)

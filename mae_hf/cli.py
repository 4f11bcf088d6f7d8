"""The scripts' command line: `parse_args` (flags over an optional JSON/YAML config file), `run_script` (errors a user
can fix as one `error: ...` paragraph and an exit code, not a traceback), and what the scripts print."""

import argparse
import contextlib
import json
import logging
import os
import re
import sys
import traceback
from dataclasses import MISSING, field

import yaml
from safetensors import SafetensorError
from transformers import HfArgumentParser
from transformers.hf_argparser import string_to_bool

TRAINER_DEBUG_OPTIONS = ("underflow_overflow", "tpu_metrics_debug")  # values of TrainingArguments' own --debug


class MAEHFError(Exception):
    """Base of the project's own errors: a failure the user can fix, reported by `run_script` (exit code 1)."""


class UsageError(MAEHFError):
    """The command line itself is wrong (a bad flag value, contradicting flags, an unusable output folder): exit code
    2, as the parser's own. Not a ValueError, so that a script's `except ValueError` for failing inputs lets it by."""


class WorkerDied(MAEHFError):
    """A DataLoader worker process died under the script (the kernel's OOM killer, a full /dev/shm, kill -9)."""


WORKER_DEATH = re.compile(r"DataLoader worker \(pids?(?:\(s\))? ([\d, ]+)\) (exited unexpectedly|is killed by signal: "
                          r"[^.]+)")


def worker_died(error: BaseException | None) -> WorkerDied | None:
    """The `WorkerDied` for an error that says a DataLoader worker died (or broke the pipe of its batch), else None."""
    found = WORKER_DEATH.search(str(error)) if isinstance(error, RuntimeError) else None
    if found:
        what = f"DataLoader worker (pid {found.group(1)}) {found.group(2)}"
    elif isinstance(error, (ConnectionError, EOFError)) and any(
            f"{os.sep}torch{os.sep}utils{os.sep}data{os.sep}" in frame.filename
            for frame in traceback.extract_tb(error.__traceback__)):
        from torch.utils.data._utils.signal_handling import _error_if_any_worker_fails

        try:  # which worker: the check torch's SIGCHLD handler makes, which may not have run yet
            _error_if_any_worker_fails()
        except RuntimeError as named:
            if WORKER_DEATH.search(str(named)):
                return worker_died(named)
        what = f"A DataLoader worker died (its batch's connection broke: {type(error).__name__} {error})".replace(
            " )", ")")
    else:
        return None
    return WorkerDied(
        f"{what}, which stops the script. The likely cause is memory: the kernel's out-of-memory killer ends the "
        "largest process (dmesg names it), or /dev/shm, through which workers hand their batches over, is full (df -h "
        "/dev/shm; a container's is often 64 MB: docker run --shm-size). Fewer DataLoader workers "
        "(--dataloader_num_workers) or a smaller batch need less.")


def user_errors() -> tuple:
    """Exceptions that mean "bad input or environment", not "bug": reported without a traceback."""
    # json.JSONDecodeError is a ValueError; SafetensorError: a weights file that does not read, or a full disk
    return MAEHFError, ValueError, OSError, yaml.YAMLError, SafetensorError


def strip_debug_flag(argv: list[str]) -> tuple[list[str], bool]:
    """`argv` without a bare `--debug` (ours, not the Trainer's `--debug underflow_overflow`), and whether it was."""
    kept, found = [], False
    for index, token in enumerate(argv):
        following = argv[index + 1] if index + 1 < len(argv) else None
        if token == "--debug" and following not in TRAINER_DEBUG_OPTIONS:
            found = True
        else:
            kept.append(token)
    return kept, found


def error_message(error: BaseException) -> str:
    """The error's text (or type) on one line, without a doubled "error:" or a DataLoader worker's traceback."""
    raw = str(error)
    if raw.startswith("Caught ") and "Original Traceback" in raw:
        last = [line for line in raw.splitlines() if line.strip()][-1]  # "package.module.Error: the message"
        raw = last.split(": ", 1)[1] if ": " in last else last
    text = " ".join(raw.split()) or type(error).__name__
    if isinstance(error, OSError) and not isinstance(error, MAEHFError) and error.filename and \
            str(error.filename) not in text:
        text += f": {error.filename}"
    return text.removeprefix("error: ")


KEEP_FREED_MEMORY_ENV = "MAE_HF_KEEP_FREED_MEMORY"  # 0: leave the C library's memory settings as they are


def keep_freed_memory_requested(warn: bool = False) -> bool:
    """MAE_HF_KEEP_FREED_MEMORY: 1 (default; true/yes/on) or 0 (false/no/off); another value warns (`warn`), keeps 1."""
    setting = os.environ.get(KEEP_FREED_MEMORY_ENV, "1").strip().lower()
    if setting in ("0", "false", "no", "off"):
        return False
    if warn and setting not in ("1", "true", "yes", "on", ""):
        print(f"warning: {KEEP_FREED_MEMORY_ENV}={os.environ[KEEP_FREED_MEMORY_ENV]!r} is neither 1 (keep freed "
              "memory, the default) nor 0 (leave the C library's settings alone): kept the default.",
              file=sys.stderr, flush=True)
    return True


def keep_freed_memory() -> bool:
    """Ask glibc to keep freed memory for reuse (no mmap, no trimming): activations stop coming back as page faults,
    at the cost of holding the peak memory (docs/cpu_speed.md). Returns whether it was applied."""
    if not keep_freed_memory_requested(warn=True):
        return False
    import ctypes

    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # glibc's; other C libraries' mallopt take other numbers, or none
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    trim_threshold, mmap_max = -1, -4  # M_TRIM_THRESHOLD (-1: never trim), M_MMAP_MAX (0: never mmap)
    return bool(mallopt(mmap_max, 0)) and bool(mallopt(trim_threshold, -1))


def close_progress_bars() -> None:
    """Close every progress bar still open (tqdm would redraw it at exit, over or after the error printed next)."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):  # tqdm's registry of live bars
        with contextlib.suppress(Exception):  # a bar half torn down already: nothing left to redraw
            bar.close()


def run_script(main, argv: list[str] | None = None, **kwargs):
    """Run a script's `main(argv, **kwargs)` (`argv` defaults to sys.argv[1:]): a usage error ends with exit code 2,
    a user error (`user_errors()`, `worker_died`) as `error: <message>` with exit code 1, Ctrl-C with 130; anything
    else is a bug and keeps its traceback. `--debug` or MAE_HF_DEBUG=1 show every traceback."""
    keep_freed_memory()
    argv, flag_given = strip_debug_flag(list(sys.argv[1:] if argv is None else argv))
    debug = flag_given or os.environ.get("MAE_HF_DEBUG", "").strip().lower() not in ("", "0", "false", "no")
    try:
        try:
            return main(argv, **kwargs)
        except (RuntimeError, ConnectionError, EOFError) as error:
            raise worker_died(error) or error
    except BaseException as error:
        close_progress_bars()  # first: the error is the last line on the terminal, not under a redrawn bar
        if isinstance(error, SystemExit):  # a script that reported an error itself: --debug shows where it came from
            if debug and error.__context__ is not None:
                traceback.print_exception(error.__context__)
            raise
        if not isinstance(error, (*user_errors(), KeyboardInterrupt)):
            raise  # a bug: its traceback
        if debug:
            traceback.print_exc()
        if isinstance(error, KeyboardInterrupt):  # where no training run handles it (probes, kNN, visualize, loading)
            print("error: interrupted (Ctrl-C): the script stopped before it finished.", file=sys.stderr, flush=True)
            sys.exit(130)
        print(f"error: {error_message(error)}", file=sys.stderr, flush=True)
        sys.exit(2 if isinstance(error, UsageError) else 1)


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help keeps the description (the script's docstring and examples) as written, and shows flags' defaults."""


def flag(default=MISSING, help: str = "", **kwargs):
    """An argument dataclass field: its default (or `default_factory=`) and its --help text."""
    return field(default=default, metadata={"help": help}, **kwargs)


def bool_or_auto(value: str) -> bool | None:
    """A `bool | None` flag's value: true/false (and yes/no, 1/0), or `auto` for the script's own decision."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return None
    return string_to_bool(value)


def parse_args(dataclass_types, argv: list[str] | None = None, description: str | None = None,
               defaults: dict | None = None):
    """`script.py [CONFIG.json|CONFIG.yaml] [--flag value ...]`: the file gives defaults, flags win. `defaults`
    (e.g. the settings a run recorded) come before both."""
    argv = list(sys.argv[1:] if argv is None else argv)
    hide_instant_progress_bars()
    path, values = None, {}
    parser = HfArgumentParser(dataclass_types, description=description, formatter_class=HelpFormatter)
    known = {action.dest for action in parser._actions}
    for action in parser._actions:  # `bool | None` flags (unset = decided later) also work bare, as bool flags do:
        if action.type is string_to_bool and action.nargs is None:  # `--do_train` = `--do_train true`
            action.nargs, action.const = "?", True
            if action.default is None:  # `--bf16 auto`: the default decision, also over a config file's value
                action.type = bool_or_auto
    if defaults:
        parser.set_defaults(**{key: value for key, value in defaults.items() if key in known})
    parser.usage = f"{parser.prog} [CONFIG.yaml|CONFIG.json] [--flag value ...]   (--help lists every flag)"
    if argv and argv[0].endswith((".json", ".yaml", ".yml")):
        path = argv.pop(0)
        if not os.path.isfile(path):
            parser.error(f"config file {path} does not exist.")
        values = read_config_file(path, parser)
        unknown = sorted(set(values) - known)
        if unknown:
            parser.error(f"{path}: unknown option(s) {unknown}.")
        for action in parser._actions:
            if action.dest in values:
                action.required = False
                values[action.dest] = _typed(action, values[action.dest], path, parser)
        parser.set_defaults(**values)
    check_renamed_flags(argv, parser)
    try:
        return parser.parse_args_into_dataclasses(argv)
    except ValueError as error:  # an argument dataclass refused a value: a usage error, not a traceback
        from_file = [key for key, value in values.items() if isinstance(value, str) and value and value in str(error)
                     and f"--{key}" not in argv]
        parser.error(f"config file {path}: {from_file[0]}: {error}" if from_file else str(error))


def _typed(action, value, path: str, parser):
    """A config file's text value as its flag's type: a bad one is reported with the file's name."""
    if not isinstance(value, str) or action.type is None:
        return value
    try:
        value = action.type(value)
    except (ValueError, TypeError, argparse.ArgumentTypeError):
        kind = "true/false" if action.type in (string_to_bool, bool_or_auto) else getattr(action.type, "__name__", "")
        parser.error(f"config file {path}: {action.dest}: {value!r} is not a valid {kind} value.".replace("  ", " "))
    if action.choices is not None and value not in action.choices:
        parser.error(f"config file {path}: {action.dest}: {value!r} is not one of {list(action.choices)}.")
    return value


# Flags of transformers 4 that transformers 5 renamed or removed (docs/migrating.md lists them): named with what to
# use instead, where the parser would only say that they are not used.
RENAMED_FLAGS = {
    "--evaluation_strategy": "transformers 5 calls it --eval_strategy",
    "--overwrite_output_dir": "transformers 5 removed it; here an existing run is continued with "
                              "--resume_from_checkpoint last, or give another --output_dir",
    "--push_to_hub_model_id": "transformers 5 calls it --hub_model_id",
    "--no_cuda": "transformers 5 calls it --use_cpu",
    "--logging_dir": "transformers 5 removed it; logs go to --output_dir",
}


def check_renamed_flags(argv: list[str], parser) -> None:
    known = {option for action in parser._actions for option in action.option_strings}
    for name in (token.split("=", 1)[0] for token in argv if token.startswith("--")):
        if name in RENAMED_FLAGS and name not in known:
            parser.error(f"{name} is a transformers 4 flag: {RENAMED_FLAGS[name]} (docs/migrating.md).")


def print_once(message: str, file=None) -> None:
    """Print from the main process only: every process of a distributed run would print the same line."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(message, file=file or sys.stdout, flush=True)


@contextlib.contextmanager
def dropped_messages(logger: str, *prefixes: str):
    """Within the block, drops `logger`'s records starting with one of `prefixes` (transformers' messages that read
    as faults but are not)."""
    def keep(record) -> bool:
        return not record.getMessage().startswith(prefixes)

    logging.getLogger(logger).addFilter(keep)
    try:
        yield
    finally:
        logging.getLogger(logger).removeFilter(keep)


INSTANT_PROGRESS_BARS = ("Loading weights", "Writing model shards")  # transformers' bars for steps of a second


def hide_instant_progress_bars() -> None:
    """No progress bar for loading or saving a model (ours take a fraction of a second: noise in a training log)."""
    from transformers.utils import logging

    def hook(factory, args, kwargs):
        if kwargs.get("desc") in INSTANT_PROGRESS_BARS:
            return logging.EmptyTqdm(*args, **kwargs)
        return factory(*args, **kwargs)

    logging.set_tqdm_hook(hook)


def read_config_file(path: str, parser) -> dict:
    """The options of a JSON/YAML config file; one that does not parse or holds no mapping is a usage error."""
    try:
        with open(path) as handle:
            values = json.load(handle) if path.endswith(".json") else yaml.safe_load(handle)
    except (ValueError, yaml.YAMLError) as error:  # json.JSONDecodeError, UnicodeDecodeError are ValueErrors
        kind = "JSON" if path.endswith(".json") else "YAML"
        parser.error(f"config file {path} is not valid {kind}: {' '.join(str(error).split())}")
    except OSError as error:
        parser.error(f"config file {path} cannot be read: {error.strerror or error}.")
    if values is None:
        values = {}  # an empty file: no options
    if not isinstance(values, dict):
        parser.error(f"config file {path} must hold a mapping of options (option: value), not a "
                     f"{type(values).__name__}.")
    # A path written ./x or ../x is relative to the config file, so that presets can name files beside them.
    folder = os.path.dirname(os.path.abspath(path))
    return {key: os.path.normpath(os.path.join(folder, value)) if isinstance(value, str) and
            value.startswith(("./", "../")) else value for key, value in values.items()}


def parse_overrides(text: str | None) -> dict:
    """`"hidden_size=128,norm_pix_loss=true,mask_ratio=0.6"` -> typed dict (int, float, bool, None or str)."""
    values = {}
    for item in filter(None, (part.strip() for part in (text or "").split(","))):
        if "=" not in item:
            raise ValueError(f"config override {item!r} is not of the form key=value.")
        key, raw = (part.strip() for part in item.split("=", 1))
        value = {"true": True, "false": False, "none": None, "null": None}.get(raw.lower(), raw)
        for cast in (int, float):
            if isinstance(value, str):
                with contextlib.suppress(ValueError):
                    value = cast(raw)
        values[key] = value
    return values

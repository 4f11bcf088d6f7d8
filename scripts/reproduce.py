"""One command from nothing to the published model: pretraining, probes, fine-tunes, comparison table, Hub folder.

    python scripts/reproduce.py --output_dir runs/reproduce                       # GPU: the default recipes
    python scripts/reproduce.py --cpu_small --dataset_name ../shared/data/cifar10 --output_dir runs/reproduce_cpu

The steps: pretrain -> linear probe + kNN, multi-block linear probe and attentive probe (pretrained and random-init
encoders) -> strong-recipe fine-tune (both) -> compare -> publish.
Each step runs the project's own script (in this process) and is skipped when its output already exists, so an
interrupted run continues where it stopped when started again with the same command. A step whose output is
incomplete (its result file missing) is done again: a Trainer step resumes from its last complete checkpoint when
it has one; otherwise the leftover folder is moved aside to `<folder>.incomplete` and the step starts over. Compare
and publish are redone whenever an earlier step ran. The time of each step is printed, and a summary at the end.

Steps and what they write under --output_dir (the step is skipped when its "done" file exists):

    pretrain                     mae/                     (done: pretraining_summary.json)
    probe_{pretrained,random}    {pretrained,random_init}/probe/      linear probe + kNN k = 20, 200
    mae_probes_{...}             {pretrained,random_init}/mae_probes/ multi-block linear probe + attentive probe
    finetune_{...}               {pretrained,random_init}/finetune/   strong recipe
    compare                      comparison.md
    publish                      hub/                     (the Hub folder; --publish_args "--push_to_hub true ...")

Each step's command is recorded in <output_dir>/reproduce_steps.json. A run again with other settings (another
--dataset_name, other --probe_args, ...) is refused before anything runs when a finished (or resumable) step would
keep the old ones: use a new --output_dir, or remove those steps' folders to redo them. Compare and publish are
simply redone when their own flags changed.

Recipes: the GPU defaults are pretrain.py's defaults and configs/finetune_strong.yaml; --cpu_small uses
configs/cpu_small.yaml and configs/cpu_small_finetune_strong.yaml. --pretrain_args, --probe_args,
--finetune_args and --publish_args append flags to those steps (e.g. --pretrain_args "--num_train_epochs 3").
"""

import argparse
import contextlib
import glob
import importlib.util
import io
import os
import shlex
import shutil
import signal
import sys
import threading
import time

from transformers import HfArgumentParser

from mae_hf.cli import UsageError, error_message, read_config_file, run_script, user_errors
from mae_hf.evaluation import check_feature_blocks
from mae_hf.inputs import read_json_object, write_json
from mae_hf.loading import ModelArguments, build_config
from mae_hf.probes import FROZEN_PROTOCOLS
from mae_hf.redaction import recorded_command, redact_argv
from mae_hf.runs import differences

SCRIPTS = os.path.dirname(os.path.abspath(__file__))
CONFIGS = os.path.normpath(os.path.join(SCRIPTS, os.pardir, "configs"))
RECORD = "reproduce_steps.json"  # in --output_dir: the command each step was last started with
STOPPED = (130, 143)  # a step stopped by SIGINT / SIGTERM (128 + signal number)
RECIPES = {"gpu": (None, "finetune_strong.yaml"),  # (pretraining config, None for the defaults; fine-tune config)
           "cpu_small": ("cpu_small.yaml", "cpu_small_finetune_strong.yaml")}


def load_script(name: str):
    """A script of this folder as a module (knn.py-style sibling imports work as when run directly)."""
    if SCRIPTS not in sys.path:
        sys.path.insert(0, SCRIPTS)
    spec = importlib.util.spec_from_file_location(f"reproduce_{name}", os.path.join(SCRIPTS, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class PathArg(str):
    """A path in a step's command: recorded absolute, so that one folder named from two directories is one command."""


def shown_path(path: str) -> str:
    """`path` as a printed command should name it to run from the current directory: relative when it lies below
    it, else absolute (a relative path that climbs out reads as if it were somewhere else)."""
    path, relative = os.path.abspath(path), os.path.relpath(path)
    return path if relative == os.pardir or relative.startswith(os.pardir + os.sep) else relative


def flag_values(argv: list[str]) -> dict[str, list[str]]:
    values, flag = {}, "(positional)"
    for token in argv:
        if token.startswith("--"):
            flag = token
            values.setdefault(flag, [])
        else:
            values.setdefault(flag, []).append(token)
    return values


def differing_flags(before: list[str], now: list[str]) -> str:
    """`--flag (was X, now Y)` for each flag whose values differ between two commands."""
    shown = (f"{flag} (was {'absent' if was is None else shlex.join(was) or 'given'}, "
             f"now {'absent' if new is None else shlex.join(new) or 'given'})"
             for flag, (was, new) in differences(flag_values(before), flag_values(now), both_only=False).items())
    return ", ".join(shown)


class StepStopped(BaseException):
    """SIGTERM while a step without its own signal handling (a probe, compare, publish) runs."""


class Step:
    """One script call: `argv` for `scripts/<script>.py`, done when every file of `done` exists in `folder`."""

    def __init__(self, name: str, script: str, argv: list[str], folder: str, done: tuple[str, ...],
                 trainer: bool = False, derived: bool = False):
        self.name, self.script, self.argv, self.folder, self.done = name, script, argv, folder, done
        self.trainer = trainer  # a Trainer run: resumable from its checkpoints
        self.derived = derived  # made from earlier steps' outputs: redone when any of them ran

    def recorded(self) -> list[str]:
        """The command as compared between runs: reproduce's own paths absolute, tokens redacted."""
        return redact_argv([os.path.abspath(token) if isinstance(token, PathArg) else str(token)
                            for token in self.argv])

    def resumable(self) -> bool:
        """A Trainer step with a checkpoint: a redo would continue it, so its settings are the old run's."""
        return self.trainer and bool(glob.glob(os.path.join(self.folder, "checkpoint-*")))

    def is_done(self) -> bool:
        return all(os.path.isfile(os.path.join(self.folder, name)) for name in self.done)

    def prepare_redo(self) -> list[str]:
        """Flags to add for a step whose folder holds an incomplete run; moves a leftover folder aside."""
        if not os.path.isdir(self.folder) or self.derived:
            return []
        if self.resumable():
            print(f"[reproduce] {self.name}: incomplete, resuming from its last complete checkpoint", flush=True)
            return ["--resume_from_checkpoint", "last"]
        if self.trainer or os.listdir(self.folder):
            aside = self.folder.rstrip(os.sep) + ".incomplete"
            shutil.rmtree(aside, ignore_errors=True)
            os.replace(self.folder, aside)
            print(f"[reproduce] {self.name}: incomplete, starting over (leftovers moved to {aside})", flush=True)
        return []

    def run(self) -> None:
        argv = self.argv + self.prepare_redo()
        print(f"[reproduce] {self.name}: {recorded_command([f'scripts/{self.script}.py', *argv])}", flush=True)
        advice = "Fix it and run the same command again: the finished steps are skipped."
        again = "run the same reproduce.py command again to continue: the finished steps are skipped."
        # The step's own command line, for what it records and advises ("resume with: ..."): reproduce.py's would not
        # run the step, and takes no --resume_from_checkpoint.
        program, sys.argv = sys.argv, [f"scripts/{self.script}.py", *argv]
        try:
            load_script(self.script).main(argv)
        except (KeyboardInterrupt, StepStopped) as stop:  # a step that handles no signal itself: one line here
            name = "SIGTERM" if isinstance(stop, StepStopped) else "Ctrl-C (SIGINT)"
            print(f"error: step {self.name} stopped by {name}; {again}", file=sys.stderr, flush=True)
            raise SystemExit(143 if isinstance(stop, StepStopped) else 130) from None
        except UsageError as error:  # a bad flag in --<step>_args: a usage error of this command too
            raise UsageError(f"step {self.name} failed ({error}). {advice}") from None
        except user_errors() as error:
            raise ValueError(f"step {self.name} failed ({error_message(error)}). {advice}") from None
        except SystemExit as exit:
            if exit.code in STOPPED:  # the step printed its `error:` line and how to resume it on its own
                print(f"[reproduce] step {self.name} stopped: {again}", file=sys.stderr, flush=True)
                raise
            if exit.code not in (None, 0):
                reason = exit.code if isinstance(exit.code, str) else f"exit code {exit.code}"
                error = UsageError if exit.code == 2 else ValueError  # 2: the step's parser refused a flag
                raise error(f"step {self.name} failed ({reason.removeprefix('error: ')}). {advice}") from None
        finally:
            sys.argv = program
        if not self.is_done():
            raise ValueError(f"step {self.name} ended without writing {', '.join(self.done)} in {self.folder}.")


def plan(args) -> list[Step]:
    pretrain_config, finetune_config = RECIPES["cpu_small" if args.cpu_small else "gpu"]
    dataset = args.dataset_name and (PathArg(args.dataset_name) if os.path.exists(args.dataset_name)
                                     else args.dataset_name)  # else a Hub name
    data = ["--dataset_name", dataset] if dataset else []
    out = args.output_dir

    def under(*parts: str) -> PathArg:
        return PathArg(os.path.join(out, *parts))

    def config(name: str) -> PathArg:
        return PathArg(shown_path(os.path.join(CONFIGS, name)))

    model = under("mae")
    split = shlex.split
    # the probe step runs the protocols on by default; mae_probes the others, with the default ones switched off
    default = [protocol for protocol in FROZEN_PROTOCOLS if protocol.reproduce_flags is None]
    others = [protocol for protocol in FROZEN_PROTOCOLS if protocol.reproduce_flags is not None]
    mae_probes_flags = [flag.format(feature_blocks=args.feature_blocks) for protocol in others
                        for flag in protocol.reproduce_flags]
    for switch in dict.fromkeys(protocol.switch for protocol in default):
        if switch not in {protocol.switch for protocol in others}:
            mae_probes_flags += [f"--{switch}", "false"]
    sources = {"pretrained": ["--model_name_or_path", model],
               "random_init": ["--model_name_or_path", model, "--random_init", "true"]}
    steps = [Step("pretrain", "pretrain", ([config(pretrain_config)] if pretrain_config else [])
                  + ["--output_dir", model, *data, *split(args.pretrain_args)],
                  model, ("pretraining_summary.json",), trainer=True)]
    for encoder, source in sources.items():
        for name, flags, protocols in (("probe", [], default), ("mae_probes", mae_probes_flags, others)):
            steps.append(Step(f"{name}_{encoder}", "linear_probe",
                              [*source, "--output_dir", under(encoder, name), *flags, *data, *split(args.probe_args)],
                              under(encoder, name), tuple(f"{protocol.name}_results.json" for protocol in protocols)))
    for encoder, source in sources.items():
        folder = under(encoder, "finetune")
        steps.append(Step(f"finetune_{encoder}", "finetune",
                          [config(finetune_config), *source, "--output_dir", folder, *data,
                           *split(args.finetune_args)], folder, ("finetune_results.json",), trainer=True))
    pretrained, random_init = under("pretrained"), under("random_init")
    steps += [
        Step("compare", "compare", [random_init, pretrained, "--output", under("comparison.md")], out,
             ("comparison.md",), derived=True),
        Step("publish", "publish",
             [model, "--probe", under("pretrained", "probe"), "--finetune", under("pretrained", "finetune"),
              "--results", random_init, under("pretrained", "mae_probes"), "--output_dir", under("hub"),
              "--overwrite", "true", *split(args.publish_args)],
             under("hub"), ("README.md",), derived=True),
    ]
    return steps


def read_record(path: str) -> dict:
    if not os.path.exists(path):
        return {}
    record = read_json_object(path, "reproduce.py's record of the command of each step of this folder (or use a new "
                                    "--output_dir)")
    if not all(isinstance(argv, list) for argv in record.values()):
        raise ValueError(f"{path} is not reproduce.py's record of step commands. Use a new --output_dir.")
    return record


def check_unchanged(steps: list[Step], record: dict, output_dir: str) -> set[str]:
    """Refuse (before anything runs) a command whose finished or resumable steps ran with other settings: skipped,
    they would keep the old settings. Returns the derived steps to redo because their own flags changed."""
    changed, redo = [], set()
    differing = differences(record, {step.name: step.recorded() for step in steps})
    for step in (step for step in steps if step.name in differing):
        if step.derived:
            redo.add(step.name)
        elif step.is_done() or step.resumable():
            changed.append(step)
    if changed:
        what = "; ".join(f"{step.name} in {step.folder}: {differing_flags(record[step.name], step.recorded())}"
                         for step in changed)
        fix = ("a new --output_dir (pretraining's model feeds every later step)" if changed[0].name == "pretrain"
               else "a new --output_dir, or remove those steps' folders to redo them")
        raise UsageError(f"--output_dir {output_dir} holds steps run with other settings than this command's: "
                         f"{what}. Skipped, they would keep the old settings. Use {fix}.")
    return redo


def run_steps(steps: list[Step], redo: set[str], record: dict, record_path: str, output_dir: str) -> None:
    times, ran = [], False
    started = time.perf_counter()
    for step in steps:
        if step.is_done() and not (step.derived and (ran or step.name in redo)):
            print(f"[reproduce] {step.name}: done already ({os.path.join(step.folder, step.done[0])}), skipped",
                  flush=True)
            times.append((step.name, None))
            continue
        record[step.name] = step.recorded()
        os.makedirs(output_dir, exist_ok=True)
        write_json(record_path, record)
        step_started = time.perf_counter()
        step.run()
        ran = True
        times.append((step.name, time.perf_counter() - step_started))
        print(f"[reproduce] {step.name}: {times[-1][1]:.1f} s", flush=True)
    print(f"[reproduce] all steps done in {time.perf_counter() - started:.1f} s; comparison: "
          f"{os.path.join(output_dir, 'comparison.md')}, Hub folder: {os.path.join(output_dir, 'hub')}")
    for name, seconds in times:
        print(f"    {name:<24} {'skipped' if seconds is None else f'{seconds:.1f} s'}")


def pretrained_layers(step: Step) -> int | None:
    """The encoder depth pretraining makes (its finished model's, else from its config file and flags), to check
    --feature_blocks before hours of pretraining; None when the flags do not resolve here (the step reports them)."""
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            if step.is_done():
                return build_config(ModelArguments(model_name_or_path=step.folder)).num_hidden_layers
            argv = list(step.argv)
            parser = HfArgumentParser(ModelArguments)
            if argv and argv[0].endswith((".yaml", ".yml", ".json")):  # the other dataclasses' options are left over
                parser.set_defaults(**read_config_file(argv.pop(0), parser))
            model_args, *_ = parser.parse_args_into_dataclasses(argv, return_remaining_strings=True)
            return build_config(model_args, norm_pix_loss=True).num_hidden_layers
    except (Exception, SystemExit):
        return None


def stop_step(signum, frame):
    raise StepStopped()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", required=True, help="Where every step writes (see above).")
    parser.add_argument("--cpu_small", action="store_true", help="The CPU-sized recipes (configs/cpu_small*.yaml).")
    parser.add_argument("--dataset_name", help="Passed to every step (default: the scripts' uoft-cs/cifar10).")
    parser.add_argument("--feature_blocks", type=int, default=4, help="Blocks of the multi-block linear probe.")
    for step in ("pretrain", "probe", "finetune", "publish"):
        parser.add_argument(f"--{step}_args", default="", help=f"Extra flags for the {step} step(s), one string.")
    args = parser.parse_args(argv)
    if args.feature_blocks < 2:
        parser.error("--feature_blocks must be at least 2 (the plain linear probe is its own step).")

    steps = plan(args)
    layers = pretrained_layers(steps[0])
    if layers is not None:
        check_feature_blocks(args.feature_blocks, layers)
    record = read_record(os.path.join(args.output_dir, RECORD))
    redo = check_unchanged(steps, record, args.output_dir)
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, stop_step) if main_thread else None  # Trainer steps set their own
    try:
        run_steps(steps, redo, record, os.path.join(args.output_dir, RECORD), args.output_dir)
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    run_script(main)

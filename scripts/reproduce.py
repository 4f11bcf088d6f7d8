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

Recipes: the GPU defaults are pretrain.py's defaults and configs/finetune_strong.yaml; --cpu_small uses
configs/cpu_small.yaml and configs/cpu_small_finetune_strong.yaml. --pretrain_args, --probe_args,
--finetune_args and --publish_args append flags to those steps (e.g. --pretrain_args "--num_train_epochs 3").
"""

import argparse
import glob
import importlib.util
import os
import shlex
import shutil
import sys
import time

from mae_hf.cli import UsageError, run_script
from mae_hf.redaction import recorded_command

SCRIPTS = os.path.dirname(os.path.abspath(__file__))
CONFIGS = os.path.join(SCRIPTS, os.pardir, "configs")
RECIPES = {  # (pretraining config or None for the defaults, fine-tune config)
    "gpu": (None, "finetune_strong.yaml"),
    "cpu_small": ("cpu_small.yaml", "cpu_small_finetune_strong.yaml"),
}
ENCODERS = ("pretrained", "random_init")


def load_script(name: str):
    """A script of this folder as a module (knn.py-style sibling imports work as when run directly)."""
    if SCRIPTS not in sys.path:
        sys.path.insert(0, SCRIPTS)
    spec = importlib.util.spec_from_file_location(f"reproduce_{name}", os.path.join(SCRIPTS, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Step:
    """One script call: `argv` for `scripts/<script>.py`, done when every file of `done` exists in `folder`."""

    def __init__(self, name: str, script: str, argv: list[str], folder: str, done: tuple[str, ...],
                 trainer: bool = False, derived: bool = False):
        self.name, self.script, self.argv, self.folder, self.done = name, script, argv, folder, done
        self.trainer = trainer  # a Trainer run: resumable from its checkpoints
        self.derived = derived  # made from earlier steps' outputs: redone when any of them ran

    def is_done(self) -> bool:
        return all(os.path.isfile(os.path.join(self.folder, name)) for name in self.done)

    def prepare_redo(self) -> list[str]:
        """Flags to add for a step whose folder holds an incomplete run; moves a leftover folder aside."""
        if not os.path.isdir(self.folder) or self.derived:
            return []
        if self.trainer and glob.glob(os.path.join(self.folder, "checkpoint-*")):
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
        program = sys.argv
        # The step's own command line, for what it records and advises (summaries, "resume with: ..."): this
        # command's would not run the step, and reproduce.py takes no --resume_from_checkpoint.
        sys.argv = [f"scripts/{self.script}.py", *argv]
        try:
            load_script(self.script).main(argv)
        except UsageError as error:  # a bad flag in --<step>_args: a usage error of this command too
            raise UsageError(f"step {self.name} failed ({error}). {advice}") from None
        except SystemExit as exit:
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
    data = ["--dataset_name", args.dataset_name] if args.dataset_name else []
    out = args.output_dir
    model = os.path.join(out, "mae")
    split = shlex.split
    steps = [Step("pretrain", "pretrain",
                  ([os.path.join(CONFIGS, pretrain_config)] if pretrain_config else [])
                  + ["--output_dir", model, *data, *split(args.pretrain_args)],
                  model, ("pretraining_summary.json",), trainer=True)]
    for encoder in ENCODERS:
        source = ["--model_name_or_path", model] + (["--random_init", "true"] if encoder == "random_init" else [])
        folder = os.path.join(out, encoder)
        steps += [
            Step(f"probe_{encoder}", "linear_probe",
                 [*source, "--output_dir", os.path.join(folder, "probe"), *data, *split(args.probe_args)],
                 os.path.join(folder, "probe"), ("linear_probe_results.json", "knn_results.json")),
            Step(f"mae_probes_{encoder}", "linear_probe",
                 [*source, "--output_dir", os.path.join(folder, "mae_probes"), "--feature_blocks",
                  str(args.feature_blocks), "--attentive_probe", "true", "--knn", "false", *data,
                  *split(args.probe_args)],
                 os.path.join(folder, "mae_probes"), ("linear_probe_multiblock_results.json",
                                                      "attentive_probe_results.json")),
        ]
    for encoder in ENCODERS:
        source = ["--model_name_or_path", model] + (["--random_init", "true"] if encoder == "random_init" else [])
        folder = os.path.join(out, encoder, "finetune")
        steps.append(Step(f"finetune_{encoder}", "finetune",
                          [os.path.join(CONFIGS, finetune_config), *source, "--output_dir", folder, *data,
                           *split(args.finetune_args)], folder, ("finetune_results.json",), trainer=True))
    pretrained, random_init = (os.path.join(out, encoder) for encoder in ENCODERS)
    steps += [
        Step("compare", "compare", [random_init, pretrained, "--output", os.path.join(out, "comparison.md")], out,
             ("comparison.md",), derived=True),
        Step("publish", "publish",
             [model, "--probe", os.path.join(pretrained, "probe"), "--finetune", os.path.join(pretrained, "finetune"),
              "--results", random_init, os.path.join(pretrained, "mae_probes"), "--output_dir",
              os.path.join(out, "hub"), "--overwrite", "true", *split(args.publish_args)],
             os.path.join(out, "hub"), ("README.md",), derived=True),
    ]
    return steps


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

    times, ran = [], False
    started = time.perf_counter()
    for step in plan(args):
        if step.is_done() and not (step.derived and ran):
            print(f"[reproduce] {step.name}: done already ({os.path.join(step.folder, step.done[0])}), skipped",
                  flush=True)
            times.append((step.name, None))
            continue
        step_started = time.perf_counter()
        step.run()
        ran = True
        times.append((step.name, time.perf_counter() - step_started))
        print(f"[reproduce] {step.name}: {times[-1][1]:.1f} s", flush=True)
    print(f"[reproduce] all steps done in {time.perf_counter() - started:.1f} s; comparison: "
          f"{os.path.join(args.output_dir, 'comparison.md')}, Hub folder: {os.path.join(args.output_dir, 'hub')}")
    for name, seconds in times:
        print(f"    {name:<24} {'skipped' if seconds is None else f'{seconds:.1f} s'}")


if __name__ == "__main__":
    run_script(main)

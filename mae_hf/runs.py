"""What can go wrong around a training run, and how each fault ends (pretrain.py and finetune.py; docs/faults.md).
`Run` holds `--output_dir` (`OutputLock`), resolves and checks the checkpoint to resume from and turns SIGINT/SIGTERM
into a stop at a step boundary; `removed_if_incomplete` / `saved_whole` leave no torn checkpoint or model behind.
"""

import contextlib
import fcntl
import os
import shutil
import signal
import socket
import sys
import threading
import time

import torch
from transformers import TrainerCallback

from .cli import MAEHFError, UsageError, close_progress_bars, dropped_messages, worker_died
from .inputs import (
    check_torch_file,
    check_weights_fit,
    file_problem,
    read_json_object,
    safetensors_shapes,
    write_failure,
    write_json,
)
from .paths import check_output_folder
from .redaction import REDACTED, recorded_command
from .settings import SETTINGS_NAME, run_settings, saved_settings

LOCK_NAME = ".run.lock"
CHECKPOINT_PREFIX = "checkpoint-"
INCOMPLETE_PREFIX = "incomplete-"  # torn checkpoints are renamed so that neither resume nor rotation picks them
# Settings a resume may change without --allow_config_change (how fast, not what: the same weights train alike);
# the change is still recorded with the resume.
FREELY_CHANGED = ("recipe.torch_compile",)


class RunError(MAEHFError):
    """A fault of the run the user can act on: reported as `error: ...` with exit code 1 (2 for a usage error)."""


class OutputDirUsageError(RunError, UsageError):
    """--output_dir is a file or holds a run that is not being resumed: the command line must change (exit code 2)."""


class NonFiniteError(RunError):
    """The loss, gradient norm or weights became non-finite (raised by training.DivergenceGuard)."""


class Interrupted(BaseException):
    """SIGINT/SIGTERM outside the step boundary: like KeyboardInterrupt, not caught by `except Exception`."""

    def __init__(self, signum: int, when: str):
        super().__init__(f"stopped by {signal.Signals(signum).name} {when}")
        self.signum = signum


# ---- checkpoints -------------------------------------------------------------------------------------------------

def checkpoint_step(folder: str) -> int | None:
    name = os.path.basename(os.path.normpath(folder))
    suffix = name[len(CHECKPOINT_PREFIX):]
    return int(suffix) if name.startswith(CHECKPOINT_PREFIX) and suffix.isdigit() else None


def checkpoints(output_dir: str) -> list[str]:
    """`checkpoint-N` folders of `output_dir`, newest (highest N) first."""
    if not os.path.isdir(output_dir):
        return []
    found = [os.path.join(output_dir, name) for name in os.listdir(output_dir)
             if checkpoint_step(name) is not None and os.path.isdir(os.path.join(output_dir, name))]
    return sorted(found, key=checkpoint_step, reverse=True)


def checkpoint_problem(folder: str) -> str | None:
    """Why `folder` is not a complete checkpoint (docs/faults.md#resuming), or None when it is."""
    state = os.path.join(folder, "trainer_state.json")  # the step every message and resume reads must be there
    problems = [file_problem(read_json_object, state) or (
                    None if type(read_json_object(state).get("global_step")) is int else
                    "trainer_state.json has no global_step"),
                file_problem(read_json_object, os.path.join(folder, "config.json")),
                file_problem(safetensors_shapes, os.path.join(folder, "model.safetensors"))]
    torch_files = {"optimizer.pt", "scheduler.pt"} | {name for name in os.listdir(folder)
                                                      if name.endswith((".pt", ".pth"))}
    problems += [file_problem(check_torch_file, os.path.join(folder, name)) for name in sorted(torch_files)]
    problems = [problem for problem in problems if problem]
    return "; ".join(problems) if problems else None


def _step_of(folder: str) -> int:
    return read_json_object(os.path.join(folder, "trainer_state.json"))["global_step"]


@contextlib.contextmanager
def removed_if_incomplete(folder: str, args):
    """Around writing checkpoint `folder`: a failed save removes the partial folder; a failed write is a clear error."""
    try:
        yield
    except BaseException as error:
        reason = write_failure(error, folder)  # before the partial files are removed (the free space tells)
        if args.should_save and os.path.isdir(folder):
            shutil.rmtree(folder, ignore_errors=True)
        if reason is not None:
            raise RunError(f"Saving {folder} failed ({reason}); the partial folder was removed. "
                           f"{resume_advice(args.output_dir)}") from error
        raise


@contextlib.contextmanager
def saved_whole(folder: str, args):
    """Around the final save of the model into `folder`: yields a staging folder to save into, whose files are then
    renamed into `folder` (each file whole, old or new); SIGINT/SIGTERM wait for the end of the save. A failed write
    leaves `folder` as it was and becomes a clear error."""
    staging = os.path.join(folder, ".saving-model")  # the final model is written here first, then moved into place
    received = []

    def hold(signum, frame):
        if not received:
            print(f"\n[stop] {signal.Signals(signum).name} received: stopping once the model is saved whole",
                  file=sys.stderr, flush=True)
        received.append(signum)

    previous = ({signum: signal.signal(signum, hold) for signum in (signal.SIGINT, signal.SIGTERM)}
                if threading.current_thread() is threading.main_thread() else {})  # only there can they be set
    run_stop = getattr(previous.get(signal.SIGINT), "__self__", None)  # inside a Run: its StopOnSignal
    run_stop = run_stop if isinstance(run_stop, StopOnSignal) else None
    try:
        shutil.rmtree(staging, ignore_errors=True)  # left by a save that was killed
        os.makedirs(staging)
        yield staging
        for name in sorted(os.listdir(staging), key=lambda name: name == "model.safetensors"):  # the weights last
            if os.path.isdir(os.path.join(folder, name)):  # a folder (DeepSpeed's) replaces the old one whole
                shutil.rmtree(os.path.join(folder, name))
            os.replace(os.path.join(staging, name), os.path.join(folder, name))
        os.rmdir(staging)
        if run_stop is not None:  # what a later stop reports as saved
            run_stop.saved = (f"the model was saved whole in {folder} first" if received else
                              f"the model was saved in {folder}") + "; the run's results and summary were not written"
    except Exception as error:
        reason = write_failure(error, staging)
        shutil.rmtree(staging, ignore_errors=True)
        if reason is None:
            raise
        raise RunError(f"Saving the model to {folder} failed ({reason}); nothing of it was written there (no torn "
                       f"file). {resume_advice(args.output_dir)}") from error
    finally:
        for signum, handler in previous.items():
            if handler is not None:  # None: a handler not installed from Python, which cannot be put back
                signal.signal(signum, handler)
    if received:  # the save is whole: now stop as the signal asks
        if run_stop is not None:
            raise Interrupted(received[0], "while the final model was being saved")
        signal.raise_signal(received[0])  # no Run: the handler in place before decides


# ---- the command to resume with ------------------------------------------------------------------------------------

def resume_command(checkpoint: str = "last") -> str:
    """This process's command line with `--resume_from_checkpoint <checkpoint>` in place of any given (under
    torchrun or accelerate launch, as a torchrun command with the same processes), tokens redacted."""
    argv, kept, skip = sys.argv[1:], [], False
    for token in argv:
        if skip:
            skip = False
        elif token == "--resume_from_checkpoint":
            skip = True
        elif not token.startswith("--resume_from_checkpoint="):
            kept.append(token)
    world, local = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    launcher = ["python"] if world == 1 else ["torchrun", "--nproc_per_node", str(local)] + (
        ["--nnodes", str(world // local)] if world != local else [])  # DDP runs started by torchrun/accelerate
    return recorded_command([sys.argv[0], *kept, "--resume_from_checkpoint", checkpoint], launcher=tuple(launcher))


def resume_advice(output_dir: str) -> str:
    last = next((folder for folder in checkpoints(output_dir) if checkpoint_problem(folder) is None), None)
    if last is None:
        return f"No complete checkpoint exists in {output_dir}; the run has to start again."
    command = resume_command()
    hidden = (f" (tokens are shown as {REDACTED}: put yours back, or leave those flags out to use your Hub login)"
              if REDACTED in command else "")
    return f"The last complete checkpoint is {last} (step {_step_of(last)}); resume with: {command}{hidden}"


# ---- the output folder -----------------------------------------------------------------------------------------

class OutputLock:
    """An exclusive `flock` on `<folder>/.run.lock` naming its holder (pid, host, start, command). The kernel
    drops it when the process dies however it dies, so a lock file left by a dead run is simply taken over."""

    def __init__(self, folder: str):
        self.path = os.path.join(folder, LOCK_NAME)
        self.handle = None

    def acquire(self) -> "OutputLock":
        while True:
            handle = open(self.path, "a+")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                holder = handle.read().strip() or "a process that has not written its pid yet"
                handle.close()
                raise RunError(f"--output_dir {os.path.dirname(self.path)} is in use by another run ({holder}). "
                               "Wait for it to end (or stop it), or choose another --output_dir.") from None
            try:  # the previous holder may have removed the file between our open and flock: lock the current one
                if os.path.samestat(os.fstat(handle.fileno()), os.stat(self.path)):
                    break
            except FileNotFoundError:
                pass
            handle.close()
        handle.seek(0)
        handle.truncate()
        started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}, started {started}: {recorded_command()}\n")
        handle.flush()
        self.handle = handle
        return self

    def release(self) -> None:
        if self.handle is not None:
            with contextlib.suppress(OSError):
                os.remove(self.path)  # a run that opened it meanwhile sees it gone (samestat) and retries
            self.handle.close()
            self.handle = None


# ---- settings compared on resume ----------------------------------------------------------------------------------

def differences(before: dict, now: dict, *, both_only: bool = True) -> dict[str, tuple]:
    """{key: (before's value, now's value)} for the keys (both record, or else either) whose values differ, sorted."""
    keys = set(before) & set(now) if both_only else set(before) | set(now)
    return {key: (before.get(key), now.get(key)) for key in sorted(keys) if before.get(key) != now.get(key)}


def segment_totals(segments: list[dict]) -> tuple[float | None, int | None]:
    """(seconds, images) of a run's training over all its segments (`Run.segments`); None where one is unknown."""
    seconds = [segment["seconds"] for segment in segments]
    images = [segment["images"] for segment in segments]
    return (None if None in seconds else round(sum(seconds), 1)), (None if None in images else sum(images))


# ---- signals ---------------------------------------------------------------------------------------------------

STOP_CHECK_STEPS = 16  # steps between the processes' agreement on a stop: a host collective, cheap but not free


class StopOnSignal(TrainerCallback):
    """The first SIGINT/SIGTERM during training stops at the end of an optimizer step, before any further save or
    evaluation; outside the loop, or a second signal, stops at once (`Interrupted`). Distributed processes agree on
    it every `STOP_CHECK_STEPS` steps and at each log/eval/save step (docs/faults.md#signals)."""

    def __init__(self):
        self.signum = self.step = None
        self.in_loop = False
        self.previous = {}
        self.group = None
        self.pid = None  # the process that installed the handler
        self.saved = "nothing was saved after the last checkpoint"  # for the stop message; set by `saved_whole`

    def install(self) -> None:
        self.pid = os.getpid()
        for signum in (signal.SIGINT, signal.SIGTERM):
            self.previous[signum] = signal.signal(signum, self._handle)

    def restore(self) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        self.previous = {}

    def _handle(self, signum, frame):
        if os.getpid() != self.pid:
            return  # a DataLoader worker (forked, with this handler): Ctrl-C reaches it too; the run itself stops
        if not self.in_loop or self.signum is not None:
            raise Interrupted(signum, "during a training step (a second signal)" if self.in_loop
                              else "outside the training loop")
        self.signum = signum
        print(f"\n[stop] {signal.Signals(signum).name} received: stopping at the end of this step (send it again to "
              "stop at once)", file=sys.stderr, flush=True)

    def on_train_begin(self, args, state, control, **kwargs):
        self.in_loop = True
        if args.world_size > 1 and torch.distributed.is_initialized():
            backend = torch.distributed.get_backend()
            self.group = None if backend == "gloo" else torch.distributed.new_group(backend="gloo")

    def on_step_end(self, args, state, control, **kwargs):
        due = (state.global_step % STOP_CHECK_STEPS == 0 or state.global_step >= state.max_steps
               or control.should_log or control.should_evaluate or control.should_save)
        self._stop_if_requested(args, state, control, due)

    def on_epoch_end(self, args, state, control, **kwargs):
        self._stop_if_requested(args, state, control, due=True)

    def _stop_if_requested(self, args, state, control, due: bool) -> None:
        """Stop now when asked; a distributed run decides together, at `due` steps only (the same on every process:
        they follow from the step number and the Trainer's own schedule)."""
        if args.world_size > 1 and torch.distributed.is_initialized():
            if not due:
                return
            signum = torch.tensor([self.signum or 0])
            torch.distributed.all_reduce(signum, op=torch.distributed.ReduceOp.MAX, group=self.group)
            self.signum = int(signum) or None
        if self.signum is not None:
            self.step = state.global_step if self.step is None else self.step
            control.should_training_stop = True
            control.should_save = control.should_evaluate = False

    def on_train_end(self, args, state, control, **kwargs):
        self.in_loop = False


class _NothingLeftToTrain(Exception):
    pass


class NoStepPastTheEnd(TrainerCallback):
    """Resuming a finished run, the Trainer would train one more step before it tests `max_steps` (or, at an epoch's
    end, log train metrics of no step): this stops it before training begins."""

    def on_train_begin(self, args, state, control, **kwargs):
        if state.global_step >= state.max_steps:
            raise _NothingLeftToTrain()

    on_step_begin = on_train_begin


# ---- the run ---------------------------------------------------------------------------------------------------

class Run:
    """`with Run(args) as run:` around a script's work; then `run.check_settings`, `run.train`, `run.record`."""

    def __init__(self, args):
        self.args = args
        self.lock = None
        self.created = []  # the folders this run made for --output_dir, deepest first (parents included)
        self.resume_from = None
        self.settings = None
        self.resumes = []
        self.earlier_segments = []  # the run's training before this process: from the checkpoint resumed
        self.clock = None  # (step, time.monotonic()) when this process's training began
        self.trained = None  # (step, seconds) when it ended
        self.stop = StopOnSignal()

    @property
    def is_main(self) -> bool:
        return self.args.process_index == 0

    def __enter__(self) -> "Run":
        self.args.device  # sets up the distributed process group, if any, before processes exchange anything
        problem, usage = None, False
        if self.is_main:
            try:
                self._claim_output_dir()
            except Exception as error:  # any failure reaches every process: none may wait for rank 0 forever
                self._release()
                problem = str(error) if isinstance(error, MAEHFError) else f"{type(error).__name__}: {error}"
                usage = isinstance(error, UsageError)
                if self.args.world_size == 1 and not isinstance(error, MAEHFError):
                    raise
        outcome = [(problem, usage, self.resume_from)]  # the main process's, on every process of a distributed run
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.broadcast_object_list(outcome, src=0)
        problem, usage, self.resume_from = outcome[0]
        if problem:
            raise (OutputDirUsageError if usage else RunError)(problem)
        self.args.resume_from_checkpoint = self.resume_from
        self.stop.install()
        return self

    def __exit__(self, kind, error, traceback):
        try:
            self.stop.restore()
            self._release()
        except RuntimeError as late:  # torch's SIGCHLD handler raises a worker's death wherever the process is
            if worker_died(late) is None:
                raise
            error = late  # names the worker, where the broken pipe that came first does not
        if isinstance(error, Interrupted):
            close_progress_bars()
            if self.is_main:
                print(f"error: {error}; {self.stop.saved}. {resume_advice(self.args.output_dir)}", file=sys.stderr,
                      flush=True)
            raise SystemExit(128 + error.signum)
        died = worker_died(error)
        if died is not None:  # the checkpoints are intact: say where to continue from
            raise RunError(f"{died} {resume_advice(self.args.output_dir)}") from error
        return False

    def _release(self) -> None:
        if self.lock is not None:
            self.lock.release()  # a second release does nothing
        for folder in self.created:  # a run that failed before writing anything leaves nothing behind, parents included
            if os.path.isdir(folder):
                if os.listdir(folder):
                    break
                os.rmdir(folder)
        self.created = []

    def _claim_output_dir(self) -> None:
        folder = self.args.output_dir
        if os.path.exists(folder):
            check_output_folder(folder, writable=False)  # the lock below is the write test
        else:
            missing = os.path.abspath(folder)
            while not os.path.exists(missing):
                self.created.append(missing)
                missing = os.path.dirname(missing)
            try:
                os.makedirs(folder)
            except OSError as error:
                raise RunError(f"--output_dir {folder} cannot be created ({error.strerror}). Give a folder you can "
                               "write to.") from None
        try:
            self.lock = OutputLock(folder).acquire()  # also the write test: nothing trains into a folder it can't save
        except OSError as error:
            raise RunError(f"--output_dir {folder} is not writable ({error.strerror}). Give a folder you can write "
                           "to.") from None
        if self.args.resume_from_checkpoint is None:
            leftovers = sorted(name for name in os.listdir(folder)
                               if checkpoint_step(name) is not None or name == "config.json")
            if leftovers:
                raise OutputDirUsageError(f"{folder} already holds a run ({', '.join(leftovers[:3])}). Continue it "
                                          "with --resume_from_checkpoint last (or a checkpoint folder), or choose "
                                          "another --output_dir.")
        else:
            self.resume_from = self._complete_checkpoint(self.args.resume_from_checkpoint)
            print(f"[resume] from {self.resume_from} (step {_step_of(self.resume_from)})", flush=True)

    def _complete_checkpoint(self, requested: str) -> str:
        """`requested` if complete, or for "last" the newest complete one (newer incomplete ones are renamed aside)."""
        option = f"--resume_from_checkpoint {requested}"
        if requested != "last":
            if not os.path.isdir(requested):
                raise RunError(f"{option}: no such folder. {resume_advice(self.args.output_dir)}")
            problem = checkpoint_problem(requested)
            if problem:
                raise RunError(f"{option} is not a complete checkpoint: {problem}. --resume_from_checkpoint last "
                               "takes the newest complete one.")
            return requested
        for folder in checkpoints(self.args.output_dir):
            problem = checkpoint_problem(folder)
            if problem is None:
                return folder
            aside = os.path.join(self.args.output_dir, INCOMPLETE_PREFIX + os.path.basename(folder))
            while os.path.exists(aside):
                aside += "_"
            os.replace(folder, aside)
            print(f"[resume] {folder} is incomplete ({problem}): renamed to {aside}", flush=True)
        raise RunError(f"{option}: no complete checkpoint-* folder in {self.args.output_dir}. Start the run again "
                       "without --resume_from_checkpoint (in a new --output_dir, or after removing this one).")

    def check_settings(self, config, data_args, model_args) -> None:
        """Refuse settings other than the resumed checkpoint's (unless --allow_config_change); write them down."""
        current = run_settings(config, data_args, self.args, model_args)
        if self.resume_from is not None:
            saved = saved_settings(self.resume_from)
            changed = {f"{group}.{key}": {"checkpoint": old, "now": new} for group in ("model", "data", "recipe")
                       for key, (old, new) in differences(saved.get(group, {}), current.get(group, {})).items()}
            refused = {key: value for key, value in changed.items() if key not in FREELY_CHANGED}
            if refused and not self.args.allow_config_change:
                listed = "; ".join(f"{key}: {value['checkpoint']!r} in the checkpoint, {value['now']!r} now"
                                   for key, value in refused.items())
                raise RunError(f"Resuming {self.resume_from} with different settings: {listed}. Resume with the "
                               "checkpoint's settings, or pass --allow_config_change true to continue with the new "
                               "ones (both are then recorded in the run's summary).")
            if refused:  # accepted: its weights must still fit the model (a size change cannot be resumed)
                check_weights_fit(self.resume_from, config, option="--resume_from_checkpoint")
            step = _step_of(self.resume_from)
            self.resumes = saved.get("resumes", []) + [{
                "checkpoint": self.resume_from, "step": step, "changed": changed}]
            # a checkpoint written before segments were recorded: its steps' time and command are unknown
            self.earlier_segments = saved.get("segments") or [{"steps": [0, step], "seconds": None, "images": None,
                                                               "command": None}]
        self.settings = {**current, "resumes": self.resumes}
        if self.is_main:
            write_json(os.path.join(self.args.output_dir, SETTINGS_NAME), self.settings)

    def train(self, trainer):
        """`trainer.train()`, resuming as resolved (nothing left to train: empty metrics); a signal stops it."""
        from transformers.trainer_utils import TrainOutput

        trainer.run_settings = self.settings_now
        trainer.add_callback(self.stop)
        trainer.add_callback(NoStepPastTheEnd())
        start = 0 if self.resume_from is None else _step_of(self.resume_from)  # before rotation may remove it
        # Both false alarms here: the resume warning compares fractional logging/eval/save steps with the counts they
        # became (`check_settings` compares what matters); checkpoints are ordered by step, whatever their mtimes.
        self.clock = (start, time.monotonic())
        try:
            with dropped_messages("transformers.trainer_utils", "Warning: The following arguments do not match",
                                  "mtime may not be reliable"):
                result = trainer.train(resume_from_checkpoint=self.resume_from)
        except _NothingLeftToTrain:
            self.stop.in_loop = False
            result = None
        if result is None or (self.resume_from is not None and trainer.state.global_step == start):
            # Nothing trained (a finished run resumed): no train metrics, where the Trainer's would state a loss of 0
            state = trainer.state
            if self.is_main:
                print(f"[resume] {self.resume_from} is the run's last step ({state.global_step} of "
                      f"{state.max_steps}): nothing left to train", flush=True)
            result = TrainOutput(state.global_step, None, {})
            self.clock = None  # no segment: nothing was trained
        else:
            self.trained = (trainer.state.global_step, time.monotonic() - self.clock[1])
        if self.stop.signum is not None:
            raise Interrupted(self.stop.signum, f"after step {self.stop.step}")
        return result

    def segments(self, step: int | None = None) -> list[dict]:
        """The run's training, one entry per process that trained it, up to `step` (earlier ones: to the checkpoint
        resumed): {"steps": [first, last], "seconds" (training loop and evaluations), "images", "command"}."""
        if self.clock is None:
            return list(self.earlier_segments)
        start, began = self.clock
        step, seconds = self.trained or (step, time.monotonic() - began)
        images = (step - start) * self.settings["recipe"]["global_batch_size"]
        return self.earlier_segments + [{"steps": [start, step], "seconds": round(seconds, 1), "images": images,
                                         "command": recorded_command()}]

    def settings_now(self, step: int) -> dict:
        """`run_settings.json` as a model saved now, at `step`, has it: the settings and the training that led to it."""
        return {**self.settings, "segments": self.segments(step)}

    def record(self, state) -> dict:
        """For the run's summary: what actually ran, besides what was asked, with every segment of the run."""
        return {"epochs": state.epoch, "epochs_requested": self.args.num_train_epochs, "steps": state.global_step,
                "max_steps": state.max_steps, "resumes": self.resumes, "segments": self.segments()}

    def train_metrics(self, metrics: dict) -> dict:
        """The Trainer's train metrics over the whole run: its own cover only this process's training, so for a
        resumed run its time, speeds and mean loss move under "last_segment" and the run's totals take their place."""
        if not self.resumes:
            return metrics
        segments = self.segments()
        seconds, images = segment_totals(segments)
        per_segment = ("train_runtime", "train_samples_per_second", "train_steps_per_second", "train_loss")
        return {**{key: value for key, value in metrics.items() if key not in per_segment},
                "train_runtime": seconds, "train_images": images,
                "train_samples_per_second": round(images / seconds, 3) if seconds else None,
                "segments": segments,
                "last_segment": {key: metrics[key] for key in per_segment if key in metrics}}


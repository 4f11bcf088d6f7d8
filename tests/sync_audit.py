"""The sync audit: runs a hot loop on the CPU as if it ran on a GPU and records every operation that would make the
host wait for the device, or copy from pageable host memory, with the project line that caused it.

The GPU is played by `torch.device("cpu", 0)` (`DEVICE`): it computes on the CPU, but the device arguments that name
it (`args.device`, accelerate's device, `x.device` of a tensor on it) are told apart from the host's plain "cpu". A
tensor is *on the device* when it was made there (a factory given `device=DEVICE`), copied there (`.to(DEVICE)`,
which the audit turns into a real copy, as on a GPU) or computed from tensors on the device; model parameters and
buffers are put there at the start. Everything else is on the host. Recorded (`Event.kind`):

- `scalar read`: `.item()`, `bool()` / `if tensor:`, `int()`, `float()` of a device tensor (a wait for the device);
- `copy to host`: `.tolist()`, `.numpy()`, `.cpu()`, `.to("cpu")`, a copy into a host tensor (but for copies with
  `non_blocking=True`, which land in pinned memory without waiting);
- `data-dependent shape`: `nonzero`, `unique`, `masked_select`, boolean-mask indexing, `repeat_interleave` with
  tensor repeats, `bincount` (the host needs the result's size);
- `blocking copy to device`: `.to(device)` / `copy_` of a host tensor without `non_blocking=True`;
- `tensor from Python data`: `torch.tensor` / `as_tensor` of Python or numpy data with `device=` the device (a copy
  from pageable memory that waits);
- `host tensor in device op`: a host tensor of one or more dimensions used with device tensors (a GPU run copies
  it, blocking, or fails; host scalars are fine).

What the CPU cannot show: whether a `non_blocking=True` copy comes from pinned memory (code paths that pin only on
CUDA never run here); on a GPU, `torch.cuda.set_sync_debug_mode("warn")` does. Where a CPU kernel reads values that
its CUDA kernel does not (`CPU_ONLY_CHECKS`), the audit follows CUDA.
"""

import dataclasses
import sys
import traceback
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]
PROJECT_FOLDERS = (str(ROOT / "mae_hf") + "/", str(ROOT / "scripts") + "/")
HERE = str(Path(__file__).resolve())
DEVICE = torch.device("cpu", 0)
_TAG = "_sync_audit_on_device"

SCALAR_READS = {"item", "__bool__", "__int__", "__float__", "__index__"}
HOST_COPIES = {"tolist", "numpy", "cpu"}
aten = torch.ops.aten
DATA_DEPENDENT = {aten.nonzero.default, aten.nonzero_numpy.default, aten.argwhere.default, aten._unique.default,
                  aten._unique2.default, aten.unique_dim.default, aten.unique_consecutive.default,
                  aten.unique_dim_consecutive.default, aten.masked_select.default, aten.bincount.default,
                  aten.repeat_interleave.Tensor, aten.repeat_interleave.self_Tensor}
# Operations whose CPU kernels read values on the host where their CUDA kernels do not: `one_hot` with a class count
# checks the labels' range on a CPU only (CUDA's scatter asserts on the device).
CPU_ONLY_CHECKS = {"one_hot"}
WATCHED = SCALAR_READS | HOST_COPIES | CPU_ONLY_CHECKS | {"__get__", "__set__", "to", "copy_", "tensor", "as_tensor",
                                                     "asarray"}
INDEXING = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default}


def on_device(tensor) -> bool:
    return isinstance(tensor, torch.Tensor) and getattr(tensor, _TAG, False)


def put_on_device(tensor):
    if isinstance(tensor, torch.Tensor):
        try:
            setattr(tensor, _TAG, True)
        except (AttributeError, RuntimeError):  # e.g. a tensor subclass without a __dict__
            pass
    return tensor


def take_off_device(tensor):
    if isinstance(tensor, torch.Tensor) and _TAG in getattr(tensor, "__dict__", {}):
        delattr(tensor, _TAG)
    return tensor


def is_device(device) -> bool:
    """Whether a device argument names the audit's device (not the host's plain "cpu")."""
    if device is None:
        return False
    device = torch.device(device) if not isinstance(device, torch.device) else device
    return device == DEVICE


def _tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)


@dataclasses.dataclass(frozen=True)
class Event:
    section: str  # e.g. "train step 3", "eval batch 2"
    kind: str
    what: str  # the operation
    where: str  # the first project frame, file:line (or the innermost frame outside torch when there is none)
    via: str  # the innermost frame outside torch (where the operation was called)

    def __str__(self):
        via = "" if self.via == self.where else f" (via {self.via})"
        return f"{self.section}: {self.kind} ({self.what}) at {self.where}{via}"


def _frames() -> tuple[str, str]:
    """(first project frame, innermost frame outside torch and this file), as path:line relative to the root."""
    project = outside = None
    for frame in reversed(traceback.extract_stack()):
        path = frame.filename
        if path == HERE or "/torch/" in path or path.startswith("<"):
            continue
        place = f"{_short(path)}:{frame.lineno}"
        outside = outside or place
        if path.startswith(PROJECT_FOLDERS):
            project = place
            break
    return project or outside or "?", outside or "?"


def _called_from_torch() -> bool:
    """Whether the operation being handled was called by torch's own Python code."""
    frame = sys._getframe(1)
    while frame is not None and frame.f_code.co_filename == HERE:
        frame = frame.f_back
    return frame is not None and "/torch/" in frame.f_code.co_filename


def _short(path: str) -> str:
    if path.startswith(str(ROOT) + "/"):
        return path[len(str(ROOT)) + 1:]
    return path.split("site-packages/")[-1]


class SyncAudit:
    """`with SyncAudit() as audit:` ... `audit.section("train step 2")` ... ; `audit.events`, `audit.counts()`.
    Nothing is recorded outside a section (`section(None)`)."""

    def __init__(self):
        self.events: list[Event] = []
        self.current: str | None = None
        self.marks: dict[str, set] = {}  # section -> what it did besides the step ("log", "save", "evaluate")
        self._quiet = 0  # inside an operation already recorded at the API level
        self.openers: dict[str, str] = {}  # torch function name -> section prefix it opens (`open_on`)
        self._opened = Counter()
        self._modes = (_FunctionMode(self), _DispatchMode(self))

    def section(self, name: str | None) -> None:
        self.current = name
        if name is not None:
            self.marks.setdefault(name, set())

    def open_on(self, function_name: str, prefix: str) -> None:
        """Each call of the torch function `function_name` opens the section `prefix N` (N = 1, 2, ...)."""
        self.openers[function_name] = prefix

    def open_next(self, prefix: str) -> None:
        self._opened[prefix] += 1
        self.section(f"{prefix} {self._opened[prefix]}")

    def mark(self, name: str, what: str) -> None:
        self.marks.setdefault(name, set()).add(what)

    def record(self, kind: str, what: str) -> None:
        if self.current is None or self._quiet:
            return
        where, via = _frames()
        self.events.append(Event(self.current, kind, what, where, via))

    def counts(self) -> Counter:
        return Counter(event.section for event in self.events)

    def in_sections(self, sections) -> list[Event]:
        sections = set(sections)
        return [event for event in self.events if event.section in sections]

    def __enter__(self):
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc):
        for mode in reversed(self._modes):
            mode.__exit__(*exc)
        self.current = None


class _FunctionMode(TorchFunctionMode):
    """The API-level view: calls that never reach the dispatcher on a CPU (`.tolist()`, `.cpu()`, `.to(...)`),
    factories with their `device=` argument, and `x.device` of a device tensor (the device, not "cpu")."""

    def __init__(self, audit: SyncAudit):
        super().__init__()
        self.audit = audit

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in self.audit.openers:
            self.audit.open_next(self.audit.openers[name])
        if name not in WATCHED:
            return func(*args, **kwargs)
        self_tensor = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if name == "__get__":
            descriptor = getattr(getattr(func, "__self__", None), "__name__", "")
            if descriptor == "device" and on_device(self_tensor):
                return DEVICE
            result = func(*args, **kwargs)
            if descriptor == "data" and on_device(self_tensor):  # `.data` is made without a dispatched operation
                put_on_device(result)
            return result
        if name == "__set__":  # `param.data = moved`, as `Module.to` does: the parameter is where `moved` is
            result = func(*args, **kwargs)
            descriptor = getattr(getattr(func, "__self__", None), "__name__", "")
            if descriptor == "data" and self_tensor is not None and len(args) > 1:
                (put_on_device if on_device(args[1]) else take_off_device)(self_tensor)
            return result
        if self_tensor is not None and on_device(self_tensor) and name in SCALAR_READS | HOST_COPIES:
            self.audit.record("scalar read" if name in SCALAR_READS else "copy to host", f".{name}()")
            with self._quiet():
                result = func(*args, **kwargs)
            return take_off_device(result) if name == "cpu" else result
        if name in CPU_ONLY_CHECKS and on_device(self_tensor):
            with self._quiet():
                return put_on_device(func(*args, **kwargs))
        if name == "to" and self_tensor is not None:
            return self._to(func, self_tensor, args, kwargs)
        if name == "copy_" and self_tensor is not None and len(args) > 1 and isinstance(args[1], torch.Tensor):
            source = args[1]
            if on_device(self_tensor) and not on_device(source) and source.dim() > 0 \
                    and not kwargs.get("non_blocking", args[2] if len(args) > 2 else False):
                self.audit.record("blocking copy to device", "copy_ of a host tensor")
            elif on_device(source) and not on_device(self_tensor) \
                    and not kwargs.get("non_blocking", args[2] if len(args) > 2 else False):
                self.audit.record("copy to host", "blocking copy_ into a host tensor")
            with self._quiet():
                return func(*args, **kwargs)
        if name in ("tensor", "as_tensor", "asarray") and is_device(kwargs.get("device")):
            data = args[0] if args else kwargs.get("data")
            if not isinstance(data, torch.Tensor):
                self.audit.record("tensor from Python data", f"torch.{name}(..., device=)")
            elif not on_device(data):
                self.audit.record("blocking copy to device", f"torch.{name}(host tensor, device=)")
            with self._quiet():
                return put_on_device(func(*args, **kwargs))
        return func(*args, **kwargs)

    @contextmanager
    def _quiet(self):
        self.audit._quiet += 1
        try:
            yield
        finally:
            self.audit._quiet -= 1

    def _to(self, func, tensor, args, kwargs):
        device, dtype, non_blocking = torch._C._nn._parse_to(*args[1:], **kwargs)[:3]
        if device is None:  # a dtype change only: stays where it is
            return func(*args, **kwargs)
        if is_device(device):
            if on_device(tensor):
                return tensor if dtype in (None, tensor.dtype) else tensor.to(dtype)
            if not non_blocking:
                self.audit.record("blocking copy to device", ".to(device)")
            with self._quiet():
                return put_on_device(tensor.to(dtype=dtype or tensor.dtype, copy=True))
        if on_device(tensor) and _called_from_torch():
            # torch's own helpers (gradient clipping, foreach optimizers) group tensors by their real device, which
            # is the host's here; on a GPU that is the GPU: no copy
            return tensor if dtype in (None, tensor.dtype) else tensor.to(dtype)
        if on_device(tensor):
            if not non_blocking:  # a non-blocking copy to the host lands in pinned memory, without waiting
                self.audit.record("copy to host", ".to('cpu')")
            with self._quiet():
                return take_off_device(tensor.to(dtype=dtype or tensor.dtype, copy=True))
        return func(*args, **kwargs)


class _DispatchMode(TorchDispatchMode):
    """The operator-level view: what device tensors take part in every aten operation (forward, backward,
    optimizer), and the operations whose result the host must wait for."""

    def __init__(self, audit: SyncAudit):
        super().__init__()
        self.audit = audit

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        with torch._C.DisableTorchFunction():  # `.dim()`, `.dtype` here are not the audited program's
            return self._dispatch(func, args, kwargs or {})

    def _dispatch(self, func, args, kwargs):
        inputs = list(_tensors(args)) + list(_tensors(kwargs))
        device_inputs = any(on_device(tensor) for tensor in inputs)
        if device_inputs:
            if func is aten._local_scalar_dense.default:
                self.audit.record("scalar read", "a tensor's value read on the host")
            elif func in DATA_DEPENDENT:
                self.audit.record("data-dependent shape", func.__name__.split(".")[0])
            elif func in INDEXING and any(tensor is not None and tensor.dtype == torch.bool
                                          for tensor in _tensors(args[1:2])):
                self.audit.record("data-dependent shape", "boolean-mask indexing")
            elif func is not aten.copy_.default:
                host = [tensor for tensor in inputs if not on_device(tensor) and tensor.dim() > 0]
                if host:
                    self.audit.record("host tensor in device op",
                                      f"{func.__name__} with a host tensor of shape {tuple(host[0].shape)}")
        result = func(*args, **kwargs)
        if func is aten.copy_.default or func is aten.copy.default:
            if not on_device(args[0]):
                return result  # a copy into a host tensor stays on the host (recorded at the API level)
        if device_inputs or is_device(kwargs.get("device")):
            for tensor in _tensors(result):
                put_on_device(tensor)
        return result


def put_module_on_device(module: torch.nn.Module) -> None:
    for tensor in [*module.parameters(), *module.buffers()]:
        put_on_device(tensor)


@contextmanager
def trainer_on_device(trainer):
    """The trainer's arguments and accelerate's state name `DEVICE` (restored after); its model's tensors are on it."""
    from accelerate.state import AcceleratorState, PartialState

    args = trainer.args
    shared = (PartialState._shared_state, AcceleratorState._shared_state)  # accelerate copies one into the other
    saved_args, saved_states = args.__dict__.get("_setup_devices"), [state.get("device") for state in shared]
    args.__dict__["_setup_devices"] = DEVICE
    for state in shared:
        state["device"] = DEVICE
    put_module_on_device(trainer.model)
    try:
        yield
    finally:
        args.__dict__["_setup_devices"] = saved_args
        for state, device in zip(shared, saved_states):
            state["device"] = device


def trainer_callback(audit: SyncAudit):
    """A callback (to be the trainer's first) that opens a section per training step ("train step N") and per
    evaluation batch ("eval batch N"), and marks the steps that log, save or evaluate."""
    from transformers import TrainerCallback

    class Sections(TrainerCallback):
        eval_batches = 0

        def on_step_begin(self, args, state, control, **kwargs):
            audit.section(f"train step {state.global_step + 1}")
            self.eval_batches = 0

        def on_prediction_step(self, args, state, control, **kwargs):
            self.eval_batches += 1
            audit.section(f"eval batch {self.eval_batches + 1}")  # the next batch's work starts now

        def on_log(self, args, state, control, **kwargs):
            audit.mark(audit.current or "", "log")

        def on_save(self, args, state, control, **kwargs):
            audit.mark(audit.current or "", "save")

        def on_evaluate(self, args, state, control, **kwargs):
            audit.mark(audit.current or "", "evaluate")

        def on_train_end(self, args, state, control, **kwargs):
            audit.section(None)

    return Sections()


def quiet_sections(audit: SyncAudit, prefix: str, first: int = 2) -> list[str]:
    """The sections `prefix N` (N >= `first`: the first step sets things up once) that neither logged, saved nor
    evaluated: they must show no event."""
    chosen = []
    for name, marks in audit.marks.items():
        if name.startswith(prefix) and int(name.rsplit(" ", 1)[1]) >= first and not marks:
            chosen.append(name)
    return chosen


@contextmanager
def sections_per_call(audit: SyncAudit, module_class=None, prefix: str = "step", optimizer_steps: bool = False):
    """Opens the section `prefix N` at each forward of a `module_class` module, or (`optimizer_steps`) the section
    `<optimizer class> step N` at each optimizer step: the hot loops that no Trainer runs (feature passes, probe
    heads)."""
    def open_section(owner, *_args, **_kwargs):
        if optimizer_steps:
            audit.open_next(f"{type(owner).__name__} step")
        elif isinstance(owner, module_class):
            audit.open_next(prefix)

    if optimizer_steps:
        from torch.optim.optimizer import register_optimizer_step_pre_hook

        handle = register_optimizer_step_pre_hook(open_section)
    else:
        handle = torch.nn.modules.module.register_module_forward_pre_hook(open_section)
    try:
        yield
    finally:
        handle.remove()


def middle_sections(audit: SyncAudit, prefix: str) -> list[str]:
    """The sections `prefix N` but the first (one-time set-up), the last (it runs on to what follows the loop) and
    those that logged, saved or evaluated."""
    numbers = sorted(int(name.rsplit(" ", 1)[1]) for name in audit.marks if name.rsplit(" ", 1)[0] == prefix)
    return [f"{prefix} {number}" for number in numbers[1:-1] if not audit.marks[f"{prefix} {number}"]]


def report(events) -> str:
    return "\n".join(str(event) for event in events) or "(none)"


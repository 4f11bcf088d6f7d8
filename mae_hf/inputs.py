"""Checks of the files a user names (model folders, their config and weights, result files): a bad one is an error
naming it, before any work, not a traceback from a loader. And files written whole or not at all (`write_json`)."""

import contextlib
import errno
import json
import os
import re
import zipfile

from .paths import folder_listing
from .redaction import redact

WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"
TORCH_WEIGHTS_FILE = "pytorch_model.bin"  # older checkpoints (ViTMAE's included): a torch.save file
OTHER_WEIGHTS_FILES = (TORCH_WEIGHTS_FILE, "pytorch_model.bin.index.json")  # shapes not read, only intactness
SAFETENSORS_FIX = "Save or copy the model again."
TEMPORARY_MARK = ".tmp-"  # a file being written: `<name>.tmp-<pid>`, renamed to <name> when whole


class FileProblem(ValueError):
    """A bad file: the message names the path, what was expected and the fix; `short` names the file alone."""

    def __init__(self, message: str, short: str):
        super().__init__(message)
        self.short = short


def read_json_object(path: str, what: str = "a JSON object") -> dict:
    """The JSON object in `path`; an empty, torn, binary or non-object file is a `FileProblem` naming it."""
    name = os.path.basename(path)
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except UnicodeDecodeError as error:  # binary bytes: the codec's message names no file
        raise FileProblem(f"{path} is not text (byte {error.object[error.start]:#04x} at position {error.start} is "
                          f"not UTF-8); expected {what}. It was overwritten or damaged: write or copy it again.",
                          f"{name} does not parse (not UTF-8 text)") from None
    if not text.strip():
        raise FileProblem(f"{path} is empty; expected {what}. It may be an interrupted write: write it again.",
                          f"{name} does not parse (empty)")
    try:
        value = json.loads(text)
    except ValueError as error:
        raise FileProblem(f"{path} is not valid JSON ({error}); expected {what}. It may be torn by an interrupted "
                          "write: write it again.", f"{name} does not parse ({' '.join(str(error).split())})") from None
    if not isinstance(value, dict):
        raise FileProblem(f"{path} holds a JSON {type(value).__name__}, not an object; expected {what}.",
                          f"{name} holds no mapping")
    return value


def file_problem(check, path: str) -> str | None:
    """Why `check(path)` refuses the file, in a few words naming it ("config.json is missing"), or None."""
    if not os.path.isfile(path):
        return f"{os.path.basename(path)} is missing"
    try:
        check(path)
    except FileProblem as error:
        return error.short
    except (OSError, ValueError) as error:
        return str(error).removesuffix(f" {SAFETENSORS_FIX}")
    return None


def safetensors_shapes(path: str) -> dict[str, list[int]]:
    """{tensor name: shape} of a .safetensors file, after checking that its header parses and that the file holds
    exactly the bytes it describes (cheap: no tensor is read)."""
    size = os.path.getsize(path)
    if size < 8:
        raise ValueError(f"{path} is {'empty' if size == 0 else f'truncated ({size} bytes)'}: not a complete "
                         f"safetensors file. {SAFETENSORS_FIX}")
    with open(path, "rb") as handle:
        header_size = int.from_bytes(handle.read(8), "little")
        if 8 + header_size > size:
            raise ValueError(f"{path} is truncated or not a safetensors file: its header says {header_size:,} "
                             f"bytes, the file has {size:,}. {SAFETENSORS_FIX}")
        try:
            header = json.loads(handle.read(header_size))
            tensors = {name: entry for name, entry in header.items() if name != "__metadata__"}
            needed = 8 + header_size + max((entry["data_offsets"][1] for entry in tensors.values()), default=0)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError):
            raise ValueError(f"{path} is corrupt: its header is not a safetensors header. {SAFETENSORS_FIX}") from None
    if size != needed:  # safetensors refuses a file of any other length
        raise ValueError(f"{path} is {'truncated' if size < needed else 'too long'}: it has {size:,} bytes, its "
                         f"header describes {needed:,}. {SAFETENSORS_FIX}")
    return {name: list(entry.get("shape", [])) for name, entry in tensors.items()}


def check_torch_file(path: str) -> None:
    """A `torch.save` file is a zip archive, whose directory a truncated one lacks (legacy pickles: left to torch)."""
    with open(path, "rb") as handle:
        start = handle.read(2)
    if start[:1] == b"\x80":  # a pickle protocol marker: the legacy format
        return
    try:
        with zipfile.ZipFile(path):
            return
    except (zipfile.BadZipFile, OSError, ValueError) as error:
        raise FileProblem(f"{path} is truncated or not a PyTorch weights file (torch.save's zip archive). "
                          f"{SAFETENSORS_FIX}", f"{os.path.basename(path)} is not a complete torch file ({error})"
                          ) from None


def weight_shapes(folder: str, option: str) -> dict[str, list[int]] | None:
    """{parameter name: shape} in a saved model folder's safetensors files, checked; None for pytorch_model.bin
    (checked whole). No weights at all is an error naming `option`."""
    single, index = os.path.join(folder, WEIGHTS_FILE), os.path.join(folder, WEIGHTS_INDEX_FILE)
    if os.path.isfile(single):
        return safetensors_shapes(single)
    if os.path.isfile(index):
        shards = sorted(set(read_json_object(index, "a safetensors index").get("weight_map", {}).values()))
        return {key: shape for shard in shards
                for key, shape in safetensors_shapes(os.path.join(folder, shard)).items()}
    if any(os.path.isfile(os.path.join(folder, name)) for name in OTHER_WEIGHTS_FILES):
        if os.path.isfile(os.path.join(folder, TORCH_WEIGHTS_FILE)):
            check_torch_file(os.path.join(folder, TORCH_WEIGHTS_FILE))
        return None
    raise ValueError(f"{option} {folder}: no model weights ({WEIGHTS_FILE}) in this folder. "
                     f"{folder_listing(os.path.join(folder, WEIGHTS_FILE))}")


def model_folder_config(folder: str, option: str) -> dict:
    """config.json of a local saved-model folder; a missing or bad one is an error naming `option`."""
    config_file = os.path.join(folder, "config.json")
    if not os.path.isfile(config_file):
        raise ValueError(f"{option} {folder}: no config.json in this folder, so it is not a saved model (the output "
                         f"folder of a script, or of save_pretrained). {folder_listing(config_file)}")
    return read_json_object(config_file, "a model config (config.json)")


def has_decoder(folder: str, architectures: list[str], option: str) -> bool:
    """Whether a saved model folder holds a pretraining model's decoder (a probe or classifier has none): by its
    weights' names, or (weights of another format) by its config's `architectures`."""
    keys = weight_shapes(folder, option)
    if keys is None:
        return any(name.endswith("ForPreTraining") for name in architectures)
    return any(key.startswith("decoder.") for key in keys)


def check_pretraining_folder(folder: str, option: str = "MODEL_DIR") -> None:
    """A folder holding an mae_hf pretraining model with its decoder; a ViTMAE folder is to be converted first."""
    config = model_folder_config(folder, option)
    model_type, architectures = config.get("model_type"), config.get("architectures") or []
    if model_type == "vit_mae":
        raise ValueError(f"{option} {folder} holds a transformers ViTMAE model; convert it to mae_hf first: "
                         f"python scripts/convert.py {folder} OUT_DIR, then pass OUT_DIR.")
    if model_type != "mae_hf":
        raise ValueError(f"{option} {folder} holds a {model_type!r} model, not an mae_hf masked autoencoder.")
    if not has_decoder(folder, architectures, option):
        kind = ", ".join(architectures) or "a model without decoder"
        raise ValueError(f"{option} {folder} has no decoder ({kind}: a linear probe or fine-tuned classifier), so "
                         "it cannot reconstruct images. Pass the pretraining folder (the --output_dir of "
                         "scripts/pretrain.py) it was made from.")


def check_weights_fit(folder: str, config, option: str = "--model_name_or_path") -> None:
    """The saved encoder and decoder weights have the shapes the config asks for (a head may be replaced)."""
    import torch

    from .modeling_mae import MAEForPreTraining

    saved = weight_shapes(folder, option)
    if not saved:
        return
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        expected = {name: list(tensor.shape) for name, tensor in MAEForPreTraining(config).state_dict().items()}
    wrong = [(name, shape, expected[name]) for name, shape in saved.items()
             if name in expected and shape != expected[name]]
    if wrong:
        name, shape, needed = wrong[0]
        raise ValueError(f"{option} {folder}: {len(wrong)} saved weight(s) do not fit the model config, e.g. {name} "
                         f"has shape {shape}, the config asks for {needed}. A trained model's sizes cannot change: "
                         "drop size changes from --config_overrides (or train fresh weights with --config_name); "
                         "without any, the folder's config.json does not belong to its weights.")


# ---- writing ------------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def written_whole(path: str):
    """Yields a temporary path to write `path` to, renamed to `path` at the end or removed on failure."""
    temporary = f"{path}{TEMPORARY_MARK}{os.getpid()}"
    try:
        yield temporary
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(temporary)
        raise


def write_json(path: str, value: dict, *, sort_keys: bool = False) -> None:
    """Write whole or not at all (`written_whole`), without Hub tokens (`redact`)."""
    with written_whole(path) as temporary:
        with open(temporary, "w") as handle:
            json.dump(redact(value), handle, indent=2, sort_keys=sort_keys)
            handle.flush()
            os.fsync(handle.fileno())


def write_failure(error: BaseException, folder: str) -> str | None:
    """Why writing into `folder` failed, when `error` is a failed write (on a full disk: an OSError, a SafetensorError,
    or torch.save's RuntimeError naming no cause, then the free space tells); None for anything else."""
    if isinstance(error, OSError):
        return os.strerror(error.errno) if error.errno else str(error)
    text = " ".join(str(error).split())
    if type(error).__name__ != "SafetensorError" and not (
            isinstance(error, RuntimeError) and ("inline_container" in text or "PytorchStreamWriter" in text)):
        return None
    cause = re.search(r"I/O error: (.+?) \(os error \d+\)", text)
    if cause:
        return cause.group(1)
    while not os.path.exists(folder):  # the free space of the file system it was written to
        folder = os.path.dirname(folder) or "."
    free = os.statvfs(folder)
    return os.strerror(errno.ENOSPC) if free.f_bavail * free.f_frsize < 2**20 else text

"""The prepared folder (scripts/prepare_data.py; docs/data.md, "Preparing once"), which `datasets` reads too:

    PREPARED/mae_hf_prepared.json               what was prepared, from what, how; each shard's size and fingerprints
    PREPARED/<split>/data-00000-of-00042.arrow  Arrow streams: image (JPEG or raw channels-first bytes), height,
                                                width, label (when the source has labels), source_row
    PREPARED/.preparing/                        an unfinished preparation (hidden: `datasets` sees no data)
"""

import hashlib
import json
import os
import re
import shlex

from ..inputs import read_json_object, write_json

PREPARED_MANIFEST = "mae_hf_prepared.json"
UNFINISHED_FOLDER = ".preparing"  # an unfinished preparation: its shards, progress and manifest (hidden from datasets)
FORMAT_NAME = "mae_hf prepared images"
FORMAT_VERSION = 1  # fingerprints came within version 1: a folder prepared before them is checked by sizes only
IMAGE_COLUMN = "image"
PREPARED_COLUMNS = {IMAGE_COLUMN, "height", "width", "source_row"}  # a prepared folder's shards, wherever they are
SAVE_TO_DISK_FILES = ("dataset_dict.json", "state.json")  # `datasets`' save_to_disk folders hold shards named alike
SHARD_NAME = re.compile(r"data-\d{5}-of-\d{5}\.arrow")
ENDS_BYTES = 1 << 16  # a shard's first and last bytes checked at every start: its first images, labels and rows
# What a manifest holds, checked on read: {key: type} of the manifest, its settings, each split and each shard.
MANIFEST_FIELDS = {"complete": bool, "identity": dict, "settings": dict, "command": str}
SETTINGS_FIELDS = {"short_side": int, "max_long_side": int, "num_channels": int, "encoding": str}
SPLIT_FIELDS = {"num_source_images": int, "num_images": int, "num_skipped": int, "max_height": int, "max_width": int,
                "shards": list}
SHARD_FIELDS = {"file": str, "rows": int, "bytes": int, "skipped": list}


def shard_file(split: str, shard: int, num_shards: int) -> str:
    """A shard's path inside the folder."""
    return os.path.join(split, f"data-{shard:05d}-of-{num_shards:05d}.arrow")


def manifest_file(folder: str) -> str | None:
    """The manifest of a prepared folder: the finished folder's, else an unfinished preparation's; None if none."""
    paths = (os.path.join(folder, PREPARED_MANIFEST), os.path.join(folder, UNFINISHED_FOLDER, PREPARED_MANIFEST))
    return next((path for path in paths if os.path.isfile(path)), None)


def is_prepared(folder: str) -> bool:
    """A folder made by scripts/prepare_data.py, finished or not."""
    return os.path.isdir(folder) and manifest_file(folder) is not None


def shards_without_manifest(folder: str) -> list[str]:
    """The prepared shards (`<split>/data-00000-of-00042.arrow`) of a folder that has no manifest (deleted, or not
    copied): without it they would be read as a plain dataset of image bytes. Told by their names and columns."""
    import pyarrow as pa

    if any(os.path.exists(os.path.join(folder, name)) for name in SAVE_TO_DISK_FILES):
        return []
    found = []
    with os.scandir(folder) as scan:
        for entry in scan:
            if entry.is_dir() and not entry.name.startswith(".") and \
                    not os.path.exists(os.path.join(entry.path, SAVE_TO_DISK_FILES[1])):
                found += sorted(os.path.join(entry.name, name) for name in os.listdir(entry.path)
                                if SHARD_NAME.fullmatch(name))
    if not found:
        return []
    try:
        with pa.OSFile(os.path.join(folder, found[0])) as source:
            columns = set(pa.ipc.open_stream(source).schema.names)
    except (OSError, pa.ArrowInvalid):
        return []  # not an Arrow stream: whatever it is, not prepared shards
    return found if PREPARED_COLUMNS <= columns else []


def prepared_source(folder: str) -> dict | None:
    """A prepared folder's source flags (dataset_name, train_dir, ...), or None for any other data."""
    if not is_prepared(folder):
        return None
    source = read_manifest(folder, require_complete=False)["identity"].get("source", {})
    return {key: value for key, value in source.items() if value is not None} or None


def prepare_command(manifest: dict, folder: str, overwrite: bool = False) -> str:
    """The recorded command that prepared the folder, writing into `folder`: the folder at hand (a copy is prepared
    in place, never its original), with `--overwrite true` when it replaces what is there."""
    try:
        words = shlex.split(manifest["command"])
    except (KeyError, TypeError, ValueError):  # an edited or damaged manifest: the flags are the user's to give
        words = []
    words = words or ["python", "scripts/prepare_data.py", "..."]
    kept, words = [], iter(words)
    for word in words:
        if word in ("--output_dir", "--overwrite"):
            next(words, None)  # its value
        elif not word.startswith(("--output_dir=", "--overwrite=")):
            kept.append(word)
    return shlex.join([*kept, "--output_dir", folder, *(["--overwrite", "true"] if overwrite else [])])


def _fields_problem(value, fields: dict, where: str) -> str | None:
    if not isinstance(value, dict):
        return f"{where} is not an object"
    for key, kind in fields.items():
        if not isinstance(value.get(key), kind) or (kind is int and isinstance(value.get(key), bool)):
            return f"{where} has no {kind.__name__} {key!r}"
    return None


def _structure_problem(manifest: dict) -> str | None:
    """What a manifest of this version lacks of what its readers use (None: nothing), splits and shards included."""
    problem = _fields_problem(manifest, MANIFEST_FIELDS, "the manifest") or \
        _fields_problem(manifest["settings"], SETTINGS_FIELDS, "its settings") or \
        next((f"its identity has no object {key!r}" for key in ("source", "settings", "splits")
              if not isinstance(manifest["identity"].get(key), dict)), None)
    if problem or not manifest["complete"]:
        return problem
    splits = manifest.get("splits")
    if not isinstance(splits, dict) or not splits:
        return "it says complete but lists no splits"
    for name, split in splits.items():
        if problem := _fields_problem(split, SPLIT_FIELDS, f"split {name!r}"):
            return problem
        if not split["shards"]:
            return f"split {name!r} lists no shards"
        for index, shard in enumerate(split["shards"]):
            if problem := _fields_problem(shard, SHARD_FIELDS, f"shard {index} of split {name!r}"):
                return problem
            if os.path.dirname(shard["file"]) != name or not SHARD_NAME.fullmatch(os.path.basename(shard["file"])):
                return f"shard {index} of split {name!r} is {shard['file']!r}, not {name}/data-*-of-*.arrow"
    return None


def read_manifest(folder: str, require_complete: bool = True) -> dict:
    """The manifest of a prepared folder, checked: this format and version, all it must hold, and finished."""
    path = manifest_file(folder) or os.path.join(folder, PREPARED_MANIFEST)
    manifest = read_json_object(path, "the manifest of a prepared folder")
    if manifest.get("format") != FORMAT_NAME or manifest.get("version") != FORMAT_VERSION:
        raise ValueError(
            f"{folder} was prepared by another version of mae_hf (format {manifest.get('format')!r} version "
            f"{manifest.get('version')!r}; this one reads version {FORMAT_VERSION}). Prepare it again from its "
            f"source: {prepare_command(manifest, folder, overwrite=True)}")
    problem = _structure_problem(manifest)
    if problem:
        raise ValueError(f"{path} is not a whole prepared-folder manifest ({problem}): it was edited or damaged. Copy "
                         f"{folder} again from where it came, or prepare it again: "
                         f"{prepare_command(manifest, folder, overwrite=True)}")
    if require_complete and not manifest["complete"]:
        raise ValueError(
            f"{folder} is only partly prepared: its preparation was interrupted. Finish it by running the same "
            f"command again (finished shards are kept): {prepare_command(manifest, folder)}")
    return manifest


def shard_fingerprints(path: str) -> dict:
    """A shard file's `sha256` (of all its bytes, computed once, when it is written) and `ends_sha256` (of its first
    and last ENDS_BYTES, checked at every start: a foreign shard of the same size has other images or labels there)."""
    with open(path, "rb") as handle:
        whole = hashlib.file_digest(handle, "sha256").hexdigest()
    return {"sha256": whole, "ends_sha256": _ends_digest(path)}


def _ends_digest(path: str) -> str:
    size = os.path.getsize(path)
    with open(path, "rb") as handle:
        head = os.pread(handle.fileno(), ENDS_BYTES, 0)
        tail = os.pread(handle.fileno(), ENDS_BYTES, max(0, size - ENDS_BYTES))
    return hashlib.sha256(head + tail).hexdigest()


def folder_fingerprint(splits: dict) -> str | None:
    """The manifest's `fingerprint`: a hash of the splits' shard fingerprints; None unless every shard has one."""
    shards = [(name, shard["file"], shard["rows"], shard.get("sha256"))
              for name, split in splits.items() for shard in split["shards"]]
    if any(digest is None for *_, digest in shards):
        return None
    return hashlib.sha256(json.dumps(shards).encode()).hexdigest()


def split_files(folder: str, manifest: dict, split: str) -> tuple[list[str], list[int]]:
    """(shard paths, row counts) of a split, each shard checked against the manifest: its size, and (a folder
    prepared with fingerprints) its first and last bytes, so that a foreign or damaged shard is named."""
    files, counts = [], []
    for shard in manifest["splits"][split]["shards"]:
        path = os.path.join(folder, shard["file"])
        problem = None
        if not os.path.isfile(path):
            problem = "is missing: the folder is incomplete (an interrupted copy?)"
        elif os.path.getsize(path) != shard["bytes"]:
            problem = (f"is {os.path.getsize(path):,} bytes, not {shard['bytes']:,}: the folder is damaged (an "
                       "interrupted copy?)")
        elif "ends_sha256" in shard and _ends_digest(path) != shard["ends_sha256"]:
            problem = ("holds other images, labels or rows than the manifest records (at the same size): a shard "
                       "of another prepared folder copied in, or a damaged one")
        if problem:
            raise ValueError(f"{folder}: shard {shard['file']} {problem}. Copy {folder} again whole, or prepare it "
                             f"again: {prepare_command(manifest, folder, overwrite=True)}")
        files.append(path)
        counts.append(shard["rows"])
    return files, counts


def load_prepared(folder: str):
    """A `DatasetDict` of the prepared splits, memory-mapped shard by shard (nothing is copied or cached)."""
    import datasets

    manifest = read_manifest(folder)
    splits = {}
    for split in manifest["splits"]:
        files, _ = split_files(folder, manifest, split)
        parts = [datasets.Dataset.from_file(path, in_memory=False) for path in files]
        splits[split] = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    return datasets.DatasetDict(splits)


def write_manifest(folder: str, manifest: dict) -> None:
    """Write the manifest whole or not at all: an unfinished preparation's in UNFINISHED_FOLDER, hidden from
    `datasets`; the finished folder's beside its splits."""
    where = folder if manifest["complete"] else os.path.join(folder, UNFINISHED_FOLDER)
    write_json(os.path.join(where, PREPARED_MANIFEST), manifest)

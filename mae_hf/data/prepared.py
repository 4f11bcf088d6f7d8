"""The prepared folder: images decoded and scaled once (scripts/prepare_data.py) and stored in shards that
`datasets` can memory-map, so that training reads each image with one `pread`, one cheap decode and no resize.

    PREPARED/mae_hf_prepared.json              what was prepared, from what, how; complete or not
    PREPARED/<split>/data-00000-of-00042.arrow  Arrow IPC streams (what `datasets` writes and memory-maps) with the
                                               columns image (JPEG or raw channels-first bytes), height, width,
                                               label (when the source has labels) and source_row

`datasets.load_dataset(PREPARED)` reads it too (as plain columns), and the folder can be pushed to the Hub as it is.
"""

import json
import os

from ..inputs import read_json_object
from .decode import Geometry

PREPARED_MANIFEST = "mae_hf_prepared.json"
FORMAT_NAME = "mae_hf prepared images"
FORMAT_VERSION = 1
IMAGE_COLUMN = "image"


def shard_file(split: str, shard: int, num_shards: int) -> str:
    """A shard's path inside the folder."""
    return os.path.join(split, f"data-{shard:05d}-of-{num_shards:05d}.arrow")


def is_prepared(folder: str) -> bool:
    return os.path.isdir(folder) and os.path.isfile(os.path.join(folder, PREPARED_MANIFEST))


def prepared_source(folder: str) -> dict | None:
    """What a prepared folder was prepared from (its source flags: dataset_name, train_dir, ...), or None for any
    other data."""
    if not is_prepared(folder):
        return None
    source = read_json_object(os.path.join(folder, PREPARED_MANIFEST)).get("identity", {}).get("source", {})
    return {key: value for key, value in source.items() if value is not None} or None


def prepare_command(manifest: dict) -> str:
    return manifest.get("command") or "python scripts/prepare_data.py ... (the command that started it)"


def read_manifest(folder: str, require_complete: bool = True) -> dict:
    """The manifest of a prepared folder, checked: this format and version, and (`require_complete`) finished."""
    path = os.path.join(folder, PREPARED_MANIFEST)
    manifest = read_json_object(path, "the manifest of a prepared folder")
    if manifest.get("format") != FORMAT_NAME or manifest.get("version") != FORMAT_VERSION:
        raise ValueError(
            f"{folder} was prepared by another version of mae_hf (format {manifest.get('format')!r} version "
            f"{manifest.get('version')!r}; this one reads version {FORMAT_VERSION}). Prepare it again from its "
            f"source: {prepare_command(manifest)} --overwrite true")
    if require_complete and not manifest.get("complete"):
        raise ValueError(
            f"{folder} is only partly prepared: its preparation was interrupted. Finish it by running the same "
            f"command again (finished shards are kept): {prepare_command(manifest)}")
    return manifest


def geometry_of(manifest: dict) -> Geometry:
    settings = manifest["settings"]
    return Geometry(settings["short_side"], settings["max_long_side"], settings["num_channels"])


def split_files(folder: str, manifest: dict, split: str) -> tuple[list[str], list[int]]:
    """(shard paths, row counts) of a split, each shard checked to exist with the size the manifest records."""
    files, counts = [], []
    for shard in manifest["splits"][split]["shards"]:
        path = os.path.join(folder, shard["file"])
        if not os.path.isfile(path) or os.path.getsize(path) != shard["bytes"]:
            found = ("missing" if not os.path.isfile(path)
                     else f"{os.path.getsize(path):,} bytes, not {shard['bytes']:,}")
            raise ValueError(f"{folder}: shard {shard['file']} is {found}: the folder is damaged (an interrupted "
                             f"copy?). Copy it again, or prepare it again: {prepare_command(manifest)} "
                             "--overwrite true")
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
    """Write the manifest whole or not at all (a new file renamed over the old one)."""
    path = os.path.join(folder, PREPARED_MANIFEST)
    temporary = f"{path}.tmp-{os.getpid()}"
    with open(temporary, "w") as handle:
        json.dump(manifest, handle, indent=2)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)

"""Finding the images, undecoded: a `DatasetDict` from a Hub id, a local dataset folder or file, or image folders
(listed in one `os.scandir` pass, not by `datasets`' imagefolder builder: docs/data.md, "Sources"); then the splits,
the image and label columns and the rows a script uses."""

import glob
import math
import os
import sys

import numpy as np

from ..cli import UsageError, print_once
from ..paths import folder_listing, looks_local
from .arguments import EVAL_SPLIT_NAMES, IMAGE_COLUMN_NAMES, LABEL_COLUMN_NAMES, DataArguments, SourceArguments
from .prepared import PREPARED_COLUMNS, PREPARED_MANIFEST, SAVE_TO_DISK_FILES, is_prepared, shards_without_manifest

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm")
SPLIT_FOLDER_NAMES = ("train", "training", *EVAL_SPLIT_NAMES)
IGNORED_FILES = ("readme", "license", ".")  # beside image folders: not data
HUB_TIMEOUT = 10  # seconds: an unreachable Hub is said at once
METADATA_FILES = ("metadata.csv", "metadata.jsonl", "metadata.parquet")  # what only `datasets`' imagefolder reads


def load_raw_dataset(args: SourceArguments, token: str | None = None):
    """A `DatasetDict` of undecoded images from image folders, a Hub id (read with `token`, if given), a local dataset
    folder or a parquet file (a prepared folder is read by `readers.PreparedSource`)."""
    import datasets

    if args.train_dir is not None:
        folders = {"train": args.train_dir, "validation": args.validation_dir}
        folders = {split: folder for split, folder in folders.items() if folder is not None}
        for split, folder in folders.items():
            option = f"--{split}_dir"
            if not os.path.isdir(folder):
                raise ValueError(f"{option} {folder}: no such folder. {folder_listing(folder)}")
            check_not_prepared(option, folder)
            check_not_split_tree(option, folder)
        return list_image_folders(folders)
    name = args.dataset_name
    if os.path.exists(name):  # a Hub id is no path, whatever folder it is run from
        check_not_prepared("--dataset_name", name)
    if os.path.isfile(name):
        if not name.endswith(".parquet"):
            raise ValueError(f"--dataset_name {name}: a single file must be a .parquet file.")
        check_parquet_files([name])
        try:
            return datasets.load_dataset("parquet", data_files={"train": name}, cache_dir=args.cache_dir)
        except Exception as error:
            raise ValueError(f"--dataset_name {name}: could not read this parquet file ({error}).") from error
    if os.path.isdir(name):
        shards = shards_without_manifest(name)  # read as a plain dataset, they would be "images that cannot be decoded"
        if shards:
            raise ValueError(f"--dataset_name {name} holds prepared shards ({shards[0]}, ...: {len(shards)} in all) "
                             f"but no manifest ({PREPARED_MANIFEST}, which says what they hold): it was deleted or not "
                             "copied. Copy the folder again whole, or prepare it again into a new folder with "
                             "scripts/prepare_data.py.")
        check_parquet_files(glob.glob(os.path.join(name, "**", "*.parquet"), recursive=True))
        if any(os.path.exists(os.path.join(name, file)) for file in SAVE_TO_DISK_FILES):
            loaded = datasets.load_from_disk(name)  # a DatasetDict, or one Dataset: the training split
            return loaded if isinstance(loaded, datasets.DatasetDict) else datasets.DatasetDict({"train": loaded})
        layout = image_folder_layout(name)
        if layout:
            return list_image_folders(layout)
        try:
            return datasets.load_dataset(name, args.dataset_config_name, cache_dir=args.cache_dir)
        except Exception as error:
            raise ValueError(
                f"--dataset_name {name}: could not read this folder as a dataset ({error}). Expected parquet files "
                "(train.parquet, test.parquet), an imagefolder tree (train/<class>/*.png), a save_to_disk folder or "
                "a folder made by scripts/prepare_data.py."
            ) from error
    if looks_local(name):
        raise ValueError(f"--dataset_name {name}: no such file or folder. {folder_listing(name)}")
    source, revision = hub_snapshot(args, token)
    try:
        loaded = datasets.load_dataset(source, args.dataset_config_name, cache_dir=args.cache_dir, token=token,
                                       revision=revision)
    except Exception as error:
        raise ValueError(
            f"--dataset_name {name}: could not load it from the Hugging Face Hub ({type(error).__name__}: {error}). "
            "Without network access, pass a local folder of parquet files (train.parquet, test.parquet), an "
            "imagefolder tree or a save_to_disk folder."
        ) from error
    if any(PREPARED_COLUMNS <= set(split.column_names) for split in loaded.values()):
        raise ValueError(f"--dataset_name {name} is a folder made by scripts/prepare_data.py, pushed to the Hub: its "
                         "shards are read from a local copy. Download it (hf download "
                         f"{name} --repo-type dataset --local-dir {name.split('/')[-1]}) and pass that folder.")
    return loaded


def hub_snapshot(args: SourceArguments, token: str | None) -> tuple[str, str | None]:
    """(what `datasets.load_dataset` reads, the revision to ask for) for the Hub id; sets `args.dataset_revision` to its
    commit. Offline: a snapshot in huggingface_hub's cache, never `datasets`' own (docs/data.md, "Sources")."""
    import datasets
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    name, revision = args.dataset_name, args.dataset_revision
    unreachable = "HF_HUB_OFFLINE=1 is set" if datasets.config.HF_HUB_OFFLINE else None
    if unreachable is None:
        try:
            info = HfApi().dataset_info(name, revision=revision, token=token, timeout=HUB_TIMEOUT)
        except (GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError) as error:
            raise ValueError(f"--dataset_name {name}: could not load it from the Hugging Face Hub ("
                             f"{' '.join(str(error).split())[:300]}). A local folder or file needs a path that exists "
                             "here.") from None
        except Exception as error:  # no network: the Hub cannot be asked
            unreachable = f"the Hub cannot be reached: {type(error).__name__}: {error}"
        else:
            args.dataset_revision = info.sha
            return name, info.sha
    try:
        folder = snapshot_download(name, repo_type="dataset", revision=revision, local_files_only=True)
    except Exception:
        raise ValueError(
            f"--dataset_name {name}: could not load it from the Hugging Face Hub ({unreachable}), and no copy "
            "downloaded from the Hub is cached here. Run once with network access, or pass a local folder of parquet "
            "files (train.parquet, test.parquet), an imagefolder tree or a save_to_disk folder.") from None
    args.dataset_revision = os.path.basename(folder)  # .../snapshots/<commit>
    print_once(f"[data] {name}: {unreachable}; reading commit {args.dataset_revision[:12]}, downloaded from the Hub "
               f"earlier ({folder})", file=sys.stderr)
    return folder, None


def check_parquet_files(paths) -> None:
    """Refuse empty (0-byte) and row-less parquet files by name: an interrupted copy, or a split written empty; the
    reader's own errors name no file ("An error occurred while generating the dataset")."""
    import pyarrow.parquet as pq

    empty = sorted(path for path in paths if os.path.getsize(path) == 0)
    if empty:
        raise ValueError(f"--dataset_name: {len(empty)} parquet file(s) are empty (0 bytes): {', '.join(empty[:5])}. "
                         "Copy or write them again.")
    for path in sorted(paths):
        try:
            rows = pq.ParquetFile(path).metadata.num_rows
        except Exception as error:
            raise ValueError(f"--dataset_name: {path} is not a readable parquet file ({error}). Copy or write it "
                             "again.") from None
        if rows == 0:
            raise ValueError(f"--dataset_name: {path} holds no rows: its split would be empty. Remove the file or "
                             "write its split again with its images.")


# ---- image folders ---------------------------------------------------------------------------------------------

def _entries(folder: str):
    """(subfolders, image files, other files) of a folder, each sorted by name, hidden entries left out."""
    found = ([], [], [])
    with os.scandir(folder) as scan:
        for entry in scan:
            if not entry.name.startswith("."):
                kind = 0 if entry.is_dir() else 1 if entry.name.lower().endswith(IMAGE_EXTENSIONS) else 2
                found[kind].append(entry.name)
    return tuple(sorted(names) for names in found)


def _holds_images(folder: str, limit: int = 256) -> bool:
    """Whether a class folder holds image files, directly or deeper (the first `limit` entries, breadth first, tell)."""
    pending, seen = [folder], 0
    while pending and seen < limit:
        try:
            scan = os.scandir(pending.pop(0))
        except OSError:  # unreadable, or a link loop: list_image_folder names it
            continue
        with scan:
            for entry in scan:
                seen += 1
                if entry.name.startswith("."):  # never the one that ends the scan
                    continue
                if entry.is_dir():
                    pending.append(entry.path)
                elif entry.name.lower().endswith(IMAGE_EXTENSIONS) and entry.is_file():
                    return True
                if seen >= limit:
                    break
    return False


def _holds_classes(folder: str, classes: list[str]) -> bool:
    """Whether any of `classes` (subfolders of `folder`) holds images (the first may be empty)."""
    return any(_holds_images(os.path.join(folder, name)) for name in classes)


def image_folder_layout(folder: str) -> dict[str, str] | None:
    """{split: folder} when `folder` is a plain image-folder tree (split folders of class folders, or class folders:
    one "train" split) with no metadata files that only `datasets`' imagefolder builder understands; else None."""
    subfolders, images, others = _entries(folder)
    if images or not subfolders or any(not name.lower().startswith(IGNORED_FILES) for name in others):
        return None
    if all(name.lower() in SPLIT_FOLDER_NAMES for name in subfolders):
        layout = {}
        for name in subfolders:
            split = os.path.join(folder, name)
            classes, _, extra = _entries(split)
            if any(file.lower() in METADATA_FILES for file in extra) or not _holds_classes(split, classes):
                return None
            layout["train" if name.lower() == "training" else name] = split
        return layout
    return {"train": folder} if _holds_classes(folder, subfolders) else None


def check_not_split_tree(option: str, folder: str) -> None:
    """Refuse a tree of split folders given as one split: its splits would be read as classes named "train" and
    "val", and the model would train on the validation images under the label "val". Split folders are all named
    like splits, and one at least holds class folders of images (classes named "train" would hold images)."""
    splits, images, _ = _entries(folder)
    if images or not splits or not all(name.lower() in SPLIT_FOLDER_NAMES for name in splits):
        return
    for name in splits:
        classes, loose, _ = _entries(os.path.join(folder, name))
        if classes and not loose and _holds_classes(os.path.join(folder, name), classes):
            break
    else:
        return
    train = next((name for name in splits if name.lower() in ("train", "training")), splits[0])
    held = next((name for wanted in EVAL_SPLIT_NAMES for name in splits if name.lower() == wanted), None)
    if option == "--validation_dir":
        fix = f"--validation_dir {os.path.join(folder, held or splits[0])}"
    else:
        fix = f"--train_dir {os.path.join(folder, train)}" + (
            f" --validation_dir {os.path.join(folder, held)}" if held else "")
    raise UsageError(f"{option} {folder} holds split folders ({', '.join(splits)}), not class folders: they would be "
                     f"read as classes named {' and '.join(splits)}. Pass {fix} (or --dataset_name {folder}).")


def source_folders(args: SourceArguments) -> list[tuple[str, str]]:
    """(option, folder) of each local folder the images are read from (a single file's: the folder it lies in)."""
    if args.train_dir:
        return [(option, folder) for option, folder in (("--train_dir", args.train_dir),
                                                         ("--validation_dir", args.validation_dir)) if folder]
    name = args.dataset_name
    if not os.path.exists(name):  # a Hub id
        return []
    return [("--dataset_name", name if os.path.isdir(name) else os.path.dirname(os.path.abspath(name)))]


def source_holding(path: str, args: SourceArguments) -> tuple[str, str] | None:
    """The (option, folder) of the source folder holding `path` (a prepared folder there joins the source), or None."""
    real = os.path.realpath(path)
    for option, folder in source_folders(args):
        inside = os.path.realpath(folder)
        if real == inside or real.startswith(inside + os.sep):
            return option, folder
    return None


def default_prepared_folder(args: SourceArguments) -> str:
    """Where a prepared copy of the source goes by default: beside its folder (beside the tree, for a split folder
    such as imagenet/train, which stays a tree of splits), never inside a source; a Hub id's under prepared/ here."""
    local = source_folders(args)
    if not local:
        return f"prepared/{args.dataset_name.replace('/', '_')}"
    name = args.train_dir or args.dataset_name
    folder = os.path.abspath(local[0][1])
    stem = "" if os.path.isdir(name) else "_" + os.path.splitext(os.path.basename(name))[0]
    if os.path.basename(folder).lower() in SPLIT_FOLDER_NAMES:
        folder = os.path.dirname(folder)
    output = os.path.join(os.path.dirname(folder), f"{os.path.basename(folder)}{stem}_prepared")
    while source_holding(output, args) and os.path.dirname(output) != os.path.dirname(os.path.dirname(output)):
        output = os.path.join(os.path.dirname(os.path.dirname(output)), os.path.basename(output))  # train/ in val/
    return output if os.path.isabs(os.path.expanduser(name)) else os.path.relpath(output)


def check_not_prepared(option: str, path: str) -> None:
    """Refuse a prepared folder, or a folder inside one, where it would be read as images or parquet files: its
    shards hold stored bytes, which would read as "cannot be decoded" or "no image files"."""
    prepared = os.path.abspath(path)
    while not is_prepared(prepared):
        if os.path.dirname(prepared) == prepared:
            return
        prepared = os.path.dirname(prepared)
    prepared = prepared if os.path.isabs(path) else os.path.relpath(prepared)
    where = "is a prepared folder (made by scripts/prepare_data.py)" if os.path.samefile(prepared, path) else \
        f"lies inside the prepared folder {prepared} (made by scripts/prepare_data.py)"
    raise UsageError(f"{option} {path} {where}, not a folder of images. Pass --dataset_name {prepared}: its splits "
                     "are read from it (--train_split / --eval_split choose them).")


def list_image_folders(folders: dict[str, str]):
    """A `DatasetDict` of image folders ({split: folder}), labels numbered by the class folders of all splits together
    (as `datasets`' imagefolder does: an evaluation split without a rare class shifts nothing)."""
    import datasets

    classes = {split: _entries(folder)[0] for split, folder in folders.items()}
    union = sorted(set().union(*classes.values()))
    for split, folder in folders.items():
        missing = [name for name in union if name not in classes[split]]
        if classes[split] and missing:  # a folder of loose images is unlabelled: it lacks no class
            print_once(f"warning: {folder} has no folder for {len(missing)} class(es) of the other split(s): "
                       f"{', '.join(missing[:10])}{' ...' if len(missing) > 10 else ''}. Labels are numbered by the "
                       "class folders of all splits together, so they mean the same classes in each.",
                       file=sys.stderr)
    return datasets.DatasetDict({split: list_image_folder(folder, union) for split, folder in folders.items()})


def list_image_folder(folder: str, class_names: list[str] | None = None):
    """A `Dataset` of undecoded images {bytes: None, path}, sorted by name, labelled by their class folder's index in
    `class_names` (default: this folder's classes); loose images without class folders have no label column."""
    import datasets
    import pyarrow as pa

    classes, loose, others = _entries(folder)
    others = [name for name in others if not name.lower().startswith(IGNORED_FILES)]
    if classes and others:
        print_once(f"note: {folder}: {len(others)} file(s) beside the class folders are not images and are left out: "
                   f"{', '.join(others[:5])}{', ...' if len(others) > 5 else ''}", file=sys.stderr)
    if classes and loose:
        raise ValueError(f"{folder} holds both image files ({loose[0]}, ...) and class folders ({classes[0]}, ...): "
                         "put every image into the folder of its class.")
    paths, labels = [os.path.join(folder, name) for name in loose], []
    class_names = class_names or classes
    number = {name: label for label, name in enumerate(class_names)}
    for name in classes:
        found, pending = [], [os.path.join(folder, name)]
        while pending:
            current = pending.pop()
            subfolders, images, _ = _entries(current)
            found += [os.path.join(current, image) for image in images]
            for subfolder in subfolders:
                path = os.path.join(current, subfolder)
                if os.path.islink(path):  # to a folder that holds it: listed forever (until 40 levels of links)
                    target, inside = os.path.realpath(path), os.path.realpath(current)
                    if inside == target or inside.startswith(target + os.sep):
                        raise ValueError(f"{path} is a symbolic link to {target}, a folder that holds the link "
                                         "itself: a loop, whose images would be listed again and again. Remove the "
                                         "link (or point it elsewhere).")
                pending.append(path)
        paths += sorted(found)
        labels += [number[name]] * len(found)
    if not paths:
        raise ValueError(f"{folder} holds no image files ({', '.join(IMAGE_EXTENSIONS)}); expected one subfolder "
                         "per class holding the images (folder/cat/1.png, ...).")
    features = {"image": datasets.Image(decode=False)}
    columns = {"image": pa.StructArray.from_arrays([pa.nulls(len(paths), pa.binary()), pa.array(paths)],
                                                   names=["bytes", "path"])}
    if classes:
        features["label"] = datasets.ClassLabel(names=class_names)
        columns["label"] = pa.array(labels, pa.int64())
    table = datasets.table.InMemoryTable(pa.table(columns))
    return datasets.Dataset(table, info=datasets.DatasetInfo(features=datasets.Features(features)))


# ---- columns and splits ----------------------------------------------------------------------------------------

def find_column(dataset, kind: str, name: str | None = None, required: bool = True) -> str | None:
    """The `kind` ("image"/"label") column: `name`, else the first of type `Image`/`ClassLabel`, else by its name."""
    import datasets

    feature_type, candidates = {"image": (datasets.Image, IMAGE_COLUMN_NAMES),
                                "label": (datasets.ClassLabel, LABEL_COLUMN_NAMES)}[kind]
    columns = list(dataset.column_names)
    if name is not None:
        if name not in columns:
            raise ValueError(f"--{kind}_column_name {name!r} is not a column of the dataset; columns: {columns}.")
        return name
    found = [column for column, feature in dataset.features.items() if isinstance(feature, feature_type)]
    found += [column for column in candidates if column in columns]
    if found:
        return found[0]
    if required:
        raise ValueError(f"No {kind} column found among {columns}; pass --{kind}_column_name.")
    return None


def as_undecoded_images(dataset, column: str):
    """The dataset with `column` as undecoded images ({bytes, path} values): parquet files written without Hugging
    Face metadata hold images as plain {bytes, path} structs, which are images too."""
    import datasets

    feature = dataset.features[column]
    if isinstance(feature, datasets.Image) or (isinstance(feature, dict) and {"bytes", "path"} <= set(feature)) or \
            (isinstance(feature, datasets.Value) and feature.dtype in ("binary", "large_binary")):  # encoded bytes
        return dataset.cast_column(column, datasets.Image(decode=False))
    raise ValueError(f"Column {column!r} holds {feature}, not images; pass --image_column_name with the image column "
                     f"(columns: {list(dataset.column_names)}).")


def select_splits(raw, args: DataArguments, source_rows_of):
    """(train, eval) `Dataset`s, their descriptions, the splits of `raw` they come from and the rows they select: the
    named splits, or train minus a held-out part with a fixed seed; then --max_*_samples random draws. Rows are counted
    in the source (`source_rows_of(split)`: `ImageSource.source_rows`), so that a source and its prepared copy select
    the same images. Nothing is written beside the data (it may be read-only)."""
    splits = list(raw.keys())
    if args.train_split not in raw:
        raise ValueError(f"--train_split {args.train_split!r} does not exist; the dataset has splits {splits}.")
    keys, names = [args.train_split, args.train_split], [args.train_split]
    held_out = None
    if args.eval_split is not None:
        if args.eval_split not in raw:
            raise ValueError(f"--eval_split {args.eval_split!r} does not exist; the dataset has splits {splits}.")
        keys[1] = args.eval_split
    else:
        named = [s for s in EVAL_SPLIT_NAMES if s in raw and s != args.train_split]
        if named and args.validation_split_percentage is None:
            keys[1] = named[0]
        else:
            held_out = 5.0 if args.validation_split_percentage is None else args.validation_split_percentage
            if not 0 < held_out < 100:
                raise ValueError(f"--validation_split_percentage must lie in (0, 100), got {held_out}.")
    rows = [np.arange(source_rows_of(key)[0]) for key in keys]
    if held_out is None:
        names.append(keys[1])
    else:
        if len(rows[0]) < 2:
            raise ValueError(f"Split {args.train_split!r} has {len(rows[0])} image(s): too few to hold out "
                             "evaluation images. Use more images or an evaluation split.")
        order = np.random.default_rng(args.split_seed).permutation(len(rows[0]))  # as Dataset.train_test_split
        held_out_count = math.ceil(held_out / 100 * len(rows[0]))
        rows = [order[held_out_count:], order[:held_out_count]]
        description = f"{held_out:g}% of {args.train_split} held out, seed {args.split_seed}"
        names = [f"{args.train_split} minus {description}", description]
    # As transformers' example scripts: shuffle with the seed, then take N (a random subset, not the first N).
    for index, option in enumerate(("max_train_samples", "max_eval_samples")):
        wanted = getattr(args, option)
        if wanted is not None:
            rows[index] = rows[index][np.random.default_rng(args.split_seed).permutation(len(rows[index]))[:wanted]]
            names[index] += f", {len(rows[index])} drawn with seed {args.split_seed}"
    selected = [_select(raw[key], chosen, source_rows_of(key)[1]) for key, chosen in zip(keys, rows)]
    return selected[0], selected[1], names, keys, rows


def _select(dataset, rows: np.ndarray, stored: np.ndarray):
    """The source rows `rows` of a split whose rows are the source rows `stored` (ascending; the split itself when
    that is all of it)."""
    positions = np.minimum(np.searchsorted(stored, rows), max(len(stored) - 1, 0))
    kept = positions[stored[positions] == rows] if len(stored) else positions[:0]
    if len(kept) == len(dataset) and np.array_equal(kept, np.arange(len(dataset))):
        return dataset
    return dataset.select(kept, keep_in_memory=True)


def source_rows(dataset, positions=None) -> np.ndarray:
    """Row numbers in the loaded split (file order) of `positions` (default: all) in `dataset`, a selection of it."""
    indices = dataset._indices  # a selection's rows; None: positions are rows
    rows = np.arange(len(dataset), dtype=np.int64) if indices is None else indices.column(0).to_numpy()
    return rows if positions is None else rows[np.asarray(positions, dtype=np.int64)]

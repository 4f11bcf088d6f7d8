"""Writing a prepared folder (the format is in prepared.py): every image of the chosen splits decoded once, scaled
to the geometry and stored in shards, as a resumable transaction under one run's lock (docs/data.md, "Preparing
once"). Shards are a process pool's tasks, written and recorded in the hidden `.preparing/`, moved into place when
all are there."""

import ctypes
import errno
import glob
import io
import math
import multiprocessing
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass

from ..cli import UsageError, flag, print_once
from ..inputs import TEMPORARY_MARK, read_json_object, write_failure, write_json, written_whole
from ..paths import check_output_folder
from ..runs import LOCK_NAME, OutputLock, RunError, differences
from .arguments import SourceArguments
from .decode import LONG_SIDE_FACTOR, BadImage, Geometry, channels_first, decode_image, open_image, orientation
from .labels import check_same_class_names, class_names_of, validate_labels
from .memory import cpus_per_process
from .prepared import (
    FORMAT_NAME,
    FORMAT_VERSION,
    IMAGE_COLUMN,
    PREPARED_MANIFEST,
    UNFINISHED_FOLDER,
    folder_fingerprint,
    is_prepared,
    prepare_command,
    read_manifest,
    shard_file,
    shard_fingerprints,
    write_manifest,
)
from .readers import open_source
from .sources import as_undecoded_images, default_prepared_folder, source_holding

PROGRESS_FOLDER = "progress"  # inside UNFINISHED_FOLDER: one record per finished shard
LEGACY_PROGRESS = "_progress"  # where earlier versions kept the progress records, beside the shards
RAW_UP_TO = 64  # short sides up to this are stored raw: JPEG would blur such small images and saves little
READ_BATCH = 64  # source rows read at a time by a worker
SOURCE_FIELDS = ("dataset_name", "dataset_config_name", "train_dir", "validation_dir", "image_column_name",
                 "label_column_name")


@dataclass
class PrepareArguments:
    """What scripts/prepare_data.py writes, and how."""

    output_dir: str | None = flag(None, "The prepared folder to write. Required.")
    short_side: int = flag(256, "Scale every image so that its short side is at most this (256 for 224 px training; "
                                "images are never scaled up).")
    max_long_side: int | None = flag(None, f"And its long side at most this (panoramas); default {LONG_SIDE_FACTOR:g} "
                                           "x --short_side. The aspect ratio is always kept.")
    num_channels: int = flag(3, "3 (RGB) or 1 (grey).")
    encoding: str = flag("auto", "'jpeg', 'raw' (uncompressed bytes) or 'auto': raw for short sides up to "
                                 f"{RAW_UP_TO}, else JPEG.")
    jpeg_quality: int = flag(90, "JPEG quality (1-100).")
    shard_size: int = flag(2048, "Images per shard (the unit of work and of resuming).")
    num_proc: int | None = flag(None, "Worker processes (default: every CPU this process may use).")
    splits: list[str] | None = flag(None, "Splits to prepare (default: every split of the source).")
    overwrite: bool = flag(False, "Replace a prepared folder (finished or not, of other settings); never another "
                                  "folder.")
    token: str | None = flag(None, "Hugging Face token for private Hub datasets.")
    disable_tqdm: bool = flag(False, "No progress bar.")

    def __post_init__(self):
        if self.output_dir is None:
            raise ValueError("--output_dir is required (the prepared folder to write).")
        self.output_dir = os.path.expanduser(self.output_dir)
        self.geometry = Geometry.for_short_side(self.short_side, self.num_channels, self.max_long_side)
        self.max_long_side = self.geometry.max_long_side
        if self.encoding == "auto":
            self.encoding = "raw" if self.short_side <= RAW_UP_TO else "jpeg"
        if self.encoding not in ("jpeg", "raw"):
            raise ValueError(f"--encoding must be jpeg, raw or auto, got {self.encoding!r}.")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"--jpeg_quality must lie in [1, 100], got {self.jpeg_quality}.")
        if self.shard_size < 1:
            raise ValueError(f"--shard_size must be at least 1, got {self.shard_size}.")
        if self.num_proc is not None and self.num_proc < 1:
            raise ValueError(f"--num_proc must be at least 1, got {self.num_proc}.")
        # `--splits train,validation` as well as `--splits train validation`
        self.splits = [part for item in self.splits or [] for part in item.split(",") if part] or None

    def settings(self, skip_bad_images: bool) -> dict:
        """What the prepared images are: a folder continues only with the same settings."""
        return {"short_side": self.short_side, "max_long_side": self.max_long_side,
                "num_channels": self.num_channels, "encoding": self.encoding,
                "jpeg_quality": self.jpeg_quality if self.encoding == "jpeg" else None,
                "shard_size": self.shard_size, "skip_bad_images": skip_bad_images}


# ---- one shard, in a worker process ------------------------------------------------------------------------------

_JOB = {}  # what every shard task needs, set before the pool forks (datasets are not sent through pipes)


def encode(value, geometry: Geometry, encoding: str, quality: int) -> tuple[bytes, int, int]:
    """(stored bytes, height, width) of one undecoded image; a JPEG that needs no change is kept byte for byte."""
    image = open_image(value)
    width, height = image.size
    unchanged = (encoding == "jpeg" and image.format == "JPEG" and image.mode == geometry.mode
                 and geometry.stored_size(height, width) == (height, width) and orientation(image) in (None, 1))
    if unchanged:
        try:
            image.load()  # a truncated file fails here, as it would in training
        except Exception as error:
            raise BadImage.of(error) from None
        data = value if isinstance(value, bytes) else value.get("bytes")
        if data is None:
            with open(value["path"], "rb") as handle:
                data = handle.read()
        return data, height, width
    image = decode_image(value, geometry)
    if encoding == "raw":
        return channels_first(image).tobytes(), image.height, image.width
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue(), image.height, image.width


def _worker_signals() -> None:
    """In each pool worker: Ctrl-C is the parent's to handle, and a worker ends with its parent (kill -9 of it)
    instead of finishing its shard into a closed pipe (a BrokenPipeError traceback)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG: SIGTERM when the parent dies
    except (OSError, AttributeError):  # not Linux: a worker may still finish its shard after a kill -9
        pass
    if os.getppid() == 1:  # the parent died before the request
        os._exit(0)


def prepare_shard(task: tuple[str, int, int, int]) -> dict:
    """Write one shard (split, shard index, first row, end row) and record it; returns its record."""
    from datasets.arrow_writer import ArrowWriter

    split, shard, start, end = task
    job = _JOB
    dataset, image_column, label_column = job["datasets"][split]
    folder, num_shards, counter = job["folder"], job["num_shards"][split], job["counter"]
    columns = {name: [] for name in job["features"][split]}  # image, height, width, source_row (, label)
    skipped = []
    for first in range(start, end, READ_BATCH):
        rows = dataset[first:min(first + READ_BATCH, end)]
        for offset, value in enumerate(rows[image_column]):
            row = first + offset
            try:
                data, height, width = encode(value, job["geometry"], job["encoding"], job["quality"])
            except BadImage as error:
                path = value.get("path") if isinstance(value, dict) else None
                where = f"row {row}" + (f" ({path})" if path else "")
                if not job["skip_bad_images"]:
                    raise BadImage(f"Split {split!r}: {where} cannot be decoded: {error}. Fix or remove it, or pass "
                                   "--skip_bad_images true to leave such images out (they are listed in the folder's "
                                   "manifest).") from None
                skipped.append(f"{where}: {error}")
                continue
            columns[IMAGE_COLUMN].append(data)
            columns["height"].append(height)
            columns["width"].append(width)
            columns["source_row"].append(row)
            if label_column is not None:
                label = rows[label_column][offset]
                columns["label"].append(-1 if label is None or label != label else int(label))
        with counter.get_lock():
            counter.value += min(READ_BATCH, end - first)
    relative = shard_file(split, shard, num_shards)
    unfinished = os.path.join(folder, UNFINISHED_FOLDER)
    path = os.path.join(unfinished, relative)
    with written_whole(path) as temporary:
        writer = ArrowWriter(features=job["features"][split], path=temporary)
        try:
            writer.write_batch(columns)
            writer.finalize()
        finally:
            writer.close()
    # fingerprinted by its writer, from the page cache: training then checks it without reading it whole
    record = {"file": relative, "rows": len(columns[IMAGE_COLUMN]), "bytes": os.path.getsize(path), "skipped": skipped,
              "max_height": max(columns["height"], default=0), "max_width": max(columns["width"], default=0),
              "image_bytes": sum(len(data) for data in columns[IMAGE_COLUMN]), **shard_fingerprints(path)}
    write_json(os.path.join(unfinished, PROGRESS_FOLDER, f"{split}-{shard:05d}.json"), record)
    return record


# ---- the whole job -------------------------------------------------------------------------------------------------

def _source_splits(source: SourceArguments, args: PrepareArguments) -> dict:
    """{split: (undecoded dataset, image column, label column)} of the splits to prepare."""
    images = open_source(source, token=args.token)
    if images.stored:
        manifest = read_manifest(source.dataset_name, require_complete=False)
        raise ValueError(f"--dataset_name {source.dataset_name} is already a prepared folder. To prepare the images "
                         "again (another size, quality, ...), prepare them from its source with the new flags: "
                         f"{prepare_command(manifest, args.output_dir)}")
    raw = images.raw
    names = args.splits or list(raw.keys())
    missing = [name for name in names if name not in raw]
    if missing:
        raise ValueError(f"--splits {','.join(missing)}: not in the dataset; it has splits {list(raw.keys())}.")
    chosen = {}
    for name in names:
        dataset = raw[name]
        if len(dataset) == 0:
            raise ValueError(f"Split {name!r} holds no images: leave it out with --splits.")
        image_column, label_column = images.columns(dataset, dataset, require_labels=False)
        if label_column is not None:  # checked before any work: a label the training scripts would refuse
            validate_labels(dataset, label_column, name, class_names_of(dataset, label_column), allow_unlabelled=True)
        chosen[name] = (as_undecoded_images(dataset, image_column), image_column, label_column)
    # Training checks the same: a label is an index into the class names, which must agree across splits.
    check_same_class_names([(name, raw[name], label) for name, (_, _, label) in chosen.items()])
    labelled = [name for name, (_, _, label) in chosen.items() if label is not None]
    unlabelled = [name for name, (_, _, label) in chosen.items() if label is None]
    if labelled and unlabelled:
        folder = source.validation_dir if source.train_dir and "validation" in unlabelled else None
        what = f"--validation_dir {folder} has no class subfolders (its images lie directly in it)" if folder else \
            f"split(s) {', '.join(unlabelled)} have no labels"
        print_once(f"note: {what}: its images are prepared unlabelled beside the labelled {', '.join(labelled)}. "
                   "Pretraining evaluates on them without a kNN monitor; the probes, kNN and fine-tuning refuse an "
                   "unlabelled evaluation split. To label them, lay them out one subfolder per class"
                   f"{f' ({folder}/<class>/image.jpg)' if folder else ''} and prepare again.", file=sys.stderr)
    return chosen


def _features(dataset, label_column: str | None):
    import datasets

    features = {IMAGE_COLUMN: datasets.Value("binary"), "height": datasets.Value("int32"),
                "width": datasets.Value("int32"), "source_row": datasets.Value("int64")}
    if label_column is not None:
        feature = dataset.features[label_column]
        features["label"] = feature if isinstance(feature, datasets.ClassLabel) else datasets.Value("int64")
    return datasets.Features(features)


def _check_output_dir(args: PrepareArguments) -> None:
    """Refuse an --output_dir that cannot be used, before the source is read (a Hub id would be downloaded first)."""
    folder = args.output_dir
    check_output_folder(folder)
    if not is_prepared(folder):
        others = [name for name in _contents(folder) if name != UNFINISHED_FOLDER]  # a run killed before its manifest
        if others:
            raise UsageError(f"--output_dir {folder} holds other files ({', '.join(others[:3])}) and is not a "
                             "prepared folder: choose a new or empty folder (nothing is overwritten).")
    elif not args.overwrite:
        manifest = read_manifest(folder, require_complete=False)
        if manifest["complete"]:
            raise UsageError(f"--output_dir {folder} already holds a finished prepared folder "
                             f"({sum(s['num_images'] for s in manifest['splits'].values()):,} images). Use it as "
                             f"--dataset_name {folder}, choose another --output_dir, or pass --overwrite true to "
                             "prepare it again.")


def _contents(folder: str) -> list[str]:
    """What a folder holds, besides the lock of the run that holds it."""
    return sorted(name for name in os.listdir(folder) if name != LOCK_NAME) if os.path.isdir(folder) else []


def _claim_folder(args: PrepareArguments, identity: dict) -> dict | None:
    """The manifest of an unfinished preparation of the same data and settings (to continue), or None for a new
    one. Other data or settings are refused (unless --overwrite), except --skip_bad_images added: the shards
    finished without it hold no bad image."""
    folder = args.output_dir
    if args.overwrite or not is_prepared(folder):  # not prepared: empty, or what a run killed before its manifest left
        for name in _contents(folder):
            path = os.path.join(folder, name)
            shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.remove(path)
        return None
    manifest = read_manifest(folder, require_complete=False)
    changes = {f"images in split {key}" if section == "splits" else key: both for section, values in identity.items()
               for key, both in differences(manifest["identity"].get(section) or {}, values, both_only=False).items()}
    if changes == {"skip_bad_images": (False, True)}:
        print(f"[prepare] {folder}: continuing with --skip_bad_images true (the shards finished without it hold no "
              "bad image)", flush=True)
        return manifest
    if changes:
        listed = "; ".join(f"{key}: {old!r} there, {new!r} now" for key, (old, new) in changes.items())
        raise UsageError(f"--output_dir {folder} holds an unfinished preparation of other data or settings "
                         f"({listed}). Continue it with its own flags, choose another --output_dir, or pass "
                         "--overwrite true.")
    return manifest


def _swept(folder: str) -> int:
    """Remove what interrupted runs left half-written (`*.tmp-<pid>`, earlier versions' progress); returns how many
    files. Only the run holding the folder's lock calls this: no live writer owns them."""
    removed = 0
    legacy = os.path.join(folder, LEGACY_PROGRESS)
    if os.path.isdir(legacy):
        removed += len(os.listdir(legacy))
        shutil.rmtree(legacy)
    for where, _, names in os.walk(folder):
        for name in names:
            if TEMPORARY_MARK in name:
                os.remove(os.path.join(where, name))
                removed += 1
    return removed


def _finished_shards(folder: str) -> dict:
    """{(split, shard): record} of the shards an earlier run finished (moved into place or not)."""
    found = {}
    progress = os.path.join(folder, UNFINISHED_FOLDER, PROGRESS_FOLDER)
    for name in glob.glob("*.json", root_dir=progress):  # none when it does not exist
        split, shard = name.removesuffix(".json").rsplit("-", 1)
        try:
            record = read_json_object(os.path.join(progress, name))
        except (OSError, ValueError):
            continue  # torn: the shard is written again
        for where in (os.path.join(folder, UNFINISHED_FOLDER), folder):
            path = os.path.join(where, record["file"])
            if os.path.isfile(path) and os.path.getsize(path) == record["bytes"]:
                found[(split, int(shard))] = record
    return found


def prepare(source: SourceArguments, args: PrepareArguments, command: str) -> dict:
    """Prepare the source's splits into `args.output_dir`; returns the finished manifest."""
    _check_output_dir(args)
    if holding := source_holding(args.output_dir, source):
        raise UsageError(f"--output_dir {args.output_dir} lies inside {holding[1]}, the folder {holding[0]} reads: the "
                         f"prepared files would be read as part of it. Choose a folder outside it, e.g. --output_dir "
                         f"{default_prepared_folder(source)}")
    splits = _source_splits(source, args)
    folder = args.output_dir
    created = not os.path.exists(folder)
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as error:
        raise _unwritable(folder, error) from None
    lock = OutputLock(folder)
    try:
        lock.acquire()  # a second preparation into the folder is refused, naming the first's process
        return _prepare_held(source, args, command, splits)
    finally:
        lock.release()
        if created and not os.listdir(folder):  # refused or failed before writing anything
            os.rmdir(folder)


def _prepare_held(source: SourceArguments, args: PrepareArguments, command: str, splits: dict) -> dict:
    """`prepare`, holding the folder's lock."""
    from tqdm.auto import tqdm

    folder, unfinished = args.output_dir, os.path.join(args.output_dir, UNFINISHED_FOLDER)
    identity = {"source": {key: getattr(source, key) for key in SOURCE_FIELDS},
                "settings": args.settings(source.skip_bad_images),
                "splits": {name: len(dataset) for name, (dataset, _, _) in splits.items()}}
    _check_output_dir(args)  # again: another run may have finished the folder while this one read its source
    manifest = _claim_folder(args, identity)
    if swept := _swept(folder):
        print(f"[prepare] {folder}: removed {swept} half-written file(s) an interrupted run left", flush=True)
    num_shards = {name: math.ceil(len(dataset) / args.shard_size) for name, (dataset, _, _) in splits.items()}
    try:
        for name in (*splits, PROGRESS_FOLDER):
            os.makedirs(os.path.join(unfinished, name), exist_ok=True)
        if manifest is None or manifest["identity"] != identity:  # new, or --skip_bad_images added: its command now
            manifest = {**(manifest or {"format": FORMAT_NAME, "version": FORMAT_VERSION, "complete": False}),
                        "identity": identity, "settings": identity["settings"], "command": command}
            write_manifest(folder, manifest)
    except OSError as error:
        raise _unwritable(folder, error) from None
    finished = _finished_shards(folder)
    tasks = [(name, shard, shard * args.shard_size, min((shard + 1) * args.shard_size, len(dataset)))
             for name, (dataset, _, _) in splits.items() for shard in range(num_shards[name])
             if (name, shard) not in finished]
    total = sum(len(dataset) for dataset, _, _ in splits.values())
    done_before = total - sum(end - start for _, _, start, end in tasks)
    if finished:
        print(f"[prepare] continuing {args.output_dir}: {len(finished)} finished shard(s) ({done_before:,} images) "
              f"kept, {len(tasks)} to go", flush=True)
    workers = min(args.num_proc or cpus_per_process(), max(1, len(tasks)))
    context = multiprocessing.get_context("fork")
    counter = context.Value("q", 0)
    _JOB.update(datasets=splits, folder=args.output_dir, num_shards=num_shards, counter=counter, geometry=args.geometry,
                encoding=args.encoding, quality=args.jpeg_quality, skip_bad_images=source.skip_bad_images,
                features={name: _features(dataset, label) for name, (dataset, _, label) in splits.items()})
    counts = ", ".join(f"{name} {len(dataset):,}" for name, (dataset, _, _) in splits.items())
    print(f"[prepare] {total:,} images of {open_source(source).description} ({counts}) -> {args.output_dir}: short "
          f"side <= {args.short_side}, long side <= {args.max_long_side}, {args.encoding}"
          f"{f' quality {args.jpeg_quality}' if args.encoding == 'jpeg' else ''}, {args.shard_size} images per shard, "
          f"{workers} process(es)", flush=True)
    started = time.perf_counter()
    bar = tqdm(total=total, initial=done_before, unit="img", desc="Preparing", disable=args.disable_tqdm)
    records = dict(finished)
    try:
        if workers == 1:
            for task in tasks:
                records[(task[0], task[1])] = prepare_shard(task)
                bar.update(counter.value - (bar.n - done_before))
        else:
            with context.Pool(workers, initializer=_worker_signals) as pool:
                pending = {(task[0], task[1]): pool.apply_async(prepare_shard, (task,)) for task in tasks}
                while pending:
                    time.sleep(0.2)
                    bar.update(counter.value - (bar.n - done_before))
                    for key in [key for key, result in pending.items() if result.ready()]:
                        records[key] = pending.pop(key).get()  # a worker's error is raised here
    except BadImage as error:  # the pool has stopped: what it finished is on disk
        kept = len(_finished_shards(folder))
        raise BadImage(f"{error} The {kept} finished shard(s) in {folder} are kept: the same command (with "
                       "--skip_bad_images true added, or once the image is fixed) continues from them.") from None
    except OSError as error:
        raise _write_failed(error, folder, command)
    except KeyboardInterrupt:
        bar.close()
        kept = len(_finished_shards(folder))  # after the pool stopped: what a new run will keep
        print(f"error: interrupted: {kept} of {sum(num_shards.values())} shards are finished and kept. Run "
              f"the same command again to continue: {command}", file=sys.stderr, flush=True)
        sys.exit(130)
    finally:
        bar.close()
        _JOB.clear()
        _swept(folder)  # the pool has stopped: what its workers left half-written goes
    try:
        _completed(folder, manifest, splits, records, num_shards)
    except OSError as error:
        raise _write_failed(error, folder, command)
    stored = sum(shard["bytes"] for split in manifest["splits"].values() for shard in split["shards"])
    skipped = sum(split["num_skipped"] for split in manifest["splits"].values())
    print(f"[prepare] done: {sum(s['num_images'] for s in manifest['splits'].values()):,} images in "
          f"{sum(num_shards.values())} shards, {stored / 2**20:,.0f} MB"
          f"{f', {skipped} skipped (listed in {PREPARED_MANIFEST})' if skipped else ''}, "
          f"{time.perf_counter() - started:,.0f} s this run. Train from it: --dataset_name {folder}", flush=True)
    return manifest


def _unwritable(folder: str, error: OSError) -> UsageError:
    """What the up-front check cannot see (a special file system, a full disk)."""
    return UsageError(f"--output_dir {folder} cannot be written ({error.strerror}). Choose a folder you can write to.")


def _write_failed(error: OSError, folder: str, command: str) -> OSError:
    """A failed write while preparing (a full disk): what is kept, and the command that continues. Any other
    `OSError` (a source image that cannot be read) as it is: it names its file."""
    written = error.filename and os.path.realpath(error.filename).startswith(os.path.realpath(folder) + os.sep)
    if not (written or error.errno in (errno.ENOSPC, errno.EDQUOT) or os.strerror(errno.ENOSPC) in str(error)):
        return error  # pyarrow's write errors may carry no errno: their text names the cause
    kept = len(_finished_shards(folder))
    return RunError(f"Writing {folder} failed ({write_failure(error, folder)}). The {kept} finished shard(s) are kept "
                    "and the half-written files removed; make room (or fix the cause) and run the same command again "
                    f"to continue: {command}")


def _completed(folder: str, manifest: dict, splits: dict, records: dict, num_shards: dict) -> None:
    """Every shard written: the shards moved into place, then the finished manifest (now the folder is a dataset)."""
    manifest["splits"] = {}
    for name, (dataset, _, label_column) in splits.items():
        shards = [records[(name, shard)] for shard in range(num_shards[name])]
        manifest["splits"][name] = {
            "num_source_images": len(dataset), "num_images": sum(shard["rows"] for shard in shards),
            "num_skipped": sum(len(shard["skipped"]) for shard in shards),
            "class_names": class_names_of(dataset, label_column) if label_column else None,
            "max_height": max(shard["max_height"] for shard in shards),
            "max_width": max(shard["max_width"] for shard in shards), "shards": shards}
        if manifest["splits"][name]["num_images"] == 0:
            raise ValueError(f"Split {name!r}: none of its {len(dataset)} images can be decoded.")
    manifest["fingerprint"] = folder_fingerprint(manifest["splits"])
    for shard in [shard for split in manifest["splits"].values() for shard in split["shards"]]:  # renames: each whole
        staged, final = os.path.join(folder, UNFINISHED_FOLDER, shard["file"]), os.path.join(folder, shard["file"])
        if os.path.isfile(staged):
            os.makedirs(os.path.dirname(final), exist_ok=True)
            os.replace(staged, final)
    manifest["complete"] = True
    write_manifest(folder, manifest)
    shutil.rmtree(os.path.join(folder, UNFINISHED_FOLDER), ignore_errors=True)

"""Every kind of image source is read through one interface (`readers.ImageReader`, `readers.ImageSource`), picked in
one place (`open_source`); what identifies a source's content is what a run records in its settings."""

import json
from types import SimpleNamespace

import pytest

from mae_hf.configuration_mae import MAEConfig
from mae_hf.data import DataArguments, load_image_splits, source_identity
from mae_hf.data.prepared import PREPARED_MANIFEST
from mae_hf.data.readers import DatasetReader, DatasetSource, ImageReader, PreparedReader, PreparedSource, open_source
from mae_hf.runs import run_settings


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, scripts, parquet_folder):
    output = tmp_path_factory.mktemp("prepared") / "out"
    scripts.prepare_data.main(["--dataset_name", str(parquet_folder), "--output_dir", str(output), "--short_side",
                               "32", "--shard_size", "16", "--num_proc", "1", "--disable_tqdm", "true"])
    return output


def recorded_data(data_args: DataArguments) -> dict:
    """The data section of the settings a run records (and a resume compares)."""
    args = SimpleNamespace(per_device_train_batch_size=1, gradient_accumulation_steps=1, world_size=1)
    return run_settings(MAEConfig(), data_args, args, SimpleNamespace(model_name_or_path=None))["data"]


def test_open_source_tells_the_kinds_apart_and_the_readers_have_the_whole_interface(prepared, parquet_folder):
    assert type(open_source(DataArguments(dataset_name=str(prepared)))) is PreparedSource
    assert type(open_source(DataArguments(dataset_name=str(parquet_folder)))) is DatasetSource
    members = [name for name in vars(ImageReader) if not name.startswith("_")] + ["__len__"]
    members += list(ImageReader.__annotations__)
    for folder, kind, encoding in ((prepared, PreparedReader, "raw"), (parquet_folder, DatasetReader, None)):
        train, _ = load_image_splits(DataArguments(dataset_name=str(folder), data_in_memory="false"), 8)
        assert type(train.reader) is kind and train.reader.encoding == encoding
        assert [name for name in members if not hasattr(train.reader, name)] == [], kind

def test_source_identity_is_what_a_run_records(prepared, parquet_folder):
    fingerprint = json.loads((prepared / PREPARED_MANIFEST).read_text())["fingerprint"]
    cases = {str(prepared): {"prepared_fingerprint": fingerprint}, str(parquet_folder): {},
             "someone/images": {"dataset_revision": "c" * 40}}
    for name, identity in cases.items():
        data_args = DataArguments(dataset_name=name, dataset_revision="c" * 40 if "/images" in name else None)
        assert source_identity(data_args) == identity
        recorded = recorded_data(data_args)
        assert {key: recorded[key] for key in identity} == identity


def test_skipped_entries_that_match_no_missing_row_are_a_damaged_manifest(tmp_path, prepared):
    import shutil

    copy = shutil.copytree(prepared, tmp_path / "copy")
    manifest = json.loads((copy / PREPARED_MANIFEST).read_text())
    manifest["splits"]["train"]["shards"][0]["skipped"].append("row 3 (x.png): an edit")
    (copy / PREPARED_MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"split 'train' lists 1 skipped image\(s\) in its manifest, but 0 of its 48 "
                                         r"source rows are not stored: the folder was edited or damaged"):
        load_image_splits(DataArguments(dataset_name=str(copy)), 8)

"""A prepared folder knows what it holds: each shard's fingerprints and the folder's, in a manifest checked on read.
Training names a foreign, damaged or missing piece (advising the folder at hand), and a resume refuses a folder
prepared again."""

import json
import shutil

import pytest
from fixtures_runs import TINY_MODEL, tiny_split

from mae_hf.data import DataArguments, load_image_splits
from mae_hf.data.prepared import PREPARED_MANIFEST
from mae_hf.inputs import read_json_object
from mae_hf.runs import SETTINGS_NAME, RunError

SHARD = "train/data-00001-of-00003.arrow"  # 48 training images in shards of 16
TINY = ",".join(f"{key}={value}" for key, value in TINY_MODEL.items())


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Two parquet datasets of the same shape (48 + 16 12x12 images) and other images."""
    folders = {}
    for name, seed in (("a", 0), ("b", 7)):
        folders[name] = tmp_path_factory.mktemp(f"source_{name}")
        tiny_split(48, seed).to_parquet(str(folders[name] / "train.parquet"))
        tiny_split(16, seed + 1).to_parquet(str(folders[name] / "test.parquet"))
    return folders


def prepare(scripts, source, output, *extra):
    scripts.prepare_data.main(["--dataset_name", str(source), "--output_dir", str(output), "--short_side", "32",
                               "--shard_size", "16", "--num_proc", "1", "--disable_tqdm", "true", *extra])
    return output


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, scripts, sources):
    """{"a": folder prepared from source a, "b": from source b}: raw shards, so equal rows give equal sizes."""
    return {name: prepare(scripts, source, tmp_path_factory.mktemp(f"prepared_{name}") / "out")
            for name, source in sources.items()}


def copied(folder, tmp_path, name="copy"):
    return shutil.copytree(folder, tmp_path / name)


def manifest(folder) -> dict:
    return json.loads((folder / PREPARED_MANIFEST).read_text())


def load(folder):
    return load_image_splits(DataArguments(dataset_name=str(folder)), 8)


def test_each_shard_and_the_folder_have_fingerprints_stable_for_the_same_images(tmp_path, scripts, sources,
                                                                                prepared):
    recorded = manifest(prepared["a"])
    shards = [shard for split in recorded["splits"].values() for shard in split["shards"]]
    assert all(len(shard["sha256"]) == len(shard["ends_sha256"]) == 64 for shard in shards)
    again = prepare(scripts, sources["a"], tmp_path / "again", "--num_proc", "2")  # same images, other run
    assert manifest(again)["fingerprint"] == recorded["fingerprint"] != manifest(prepared["b"])["fingerprint"]


def test_a_foreign_shard_of_the_same_size_is_named(tmp_path, prepared):
    copy = copied(prepared["a"], tmp_path)
    foreign = prepared["b"] / SHARD
    assert foreign.stat().st_size == (copy / SHARD).stat().st_size  # the size check alone cannot tell
    shutil.copy(foreign, copy / SHARD)
    with pytest.raises(ValueError) as error:
        load(copy)
    message = str(error.value)
    assert f"{copy}: shard {SHARD} holds other images, labels or rows than the manifest records" in message
    assert f"--output_dir {copy} --overwrite true" in message


def test_advice_names_the_folder_at_hand_never_the_recorded_original(tmp_path, prepared):
    original = prepared["a"]
    damaged = copied(original, tmp_path, "damaged")
    (damaged / SHARD).write_bytes((damaged / SHARD).read_bytes()[:100])
    unfinished = copied(original, tmp_path, "unfinished")
    (unfinished / PREPARED_MANIFEST).write_text(json.dumps({**manifest(unfinished), "complete": False}))
    for folder, told in ((damaged, f"shard {SHARD} is 100 bytes"), (unfinished, "is only partly prepared")):
        with pytest.raises(ValueError, match=told) as error:
            load(folder)
        message = str(error.value)
        assert f"--output_dir {folder}" in message and f"--output_dir {original}" not in message


def test_shards_without_their_manifest_are_named(tmp_path, prepared):
    copy = copied(prepared["a"], tmp_path)
    (copy / PREPARED_MANIFEST).unlink()
    with pytest.raises(ValueError, match=rf"--dataset_name {copy} holds prepared shards \(test/data-00000-of-00001"
                                         rf"\.arrow, \.\.\.: 4 in all\) but no manifest \({PREPARED_MANIFEST}"):
        load(copy)


def test_a_binary_manifest_is_named(tmp_path, prepared):
    copy = copied(prepared["a"], tmp_path)
    (copy / PREPARED_MANIFEST).write_bytes(b"\x80\x04\x95 not text")
    expected = rf"{copy / PREPARED_MANIFEST} is not text \(byte 0x80 at position 0 is not UTF-8\)"
    with pytest.raises(ValueError, match=expected):
        load(copy)
    with pytest.raises(ValueError, match=expected):  # every caller of read_json_object: the file is named
        read_json_object(str(copy / PREPARED_MANIFEST))


@pytest.mark.parametrize("damage, problem", [
    (lambda m: m.pop("splits"), "it says complete but lists no splits"),
    (lambda m: m["splits"]["train"]["shards"][1].pop("bytes"), "shard 1 of split 'train' has no int 'bytes'"),
    (lambda m: m["settings"].pop("short_side"), "its settings has no int 'short_side'"),
    (lambda m: m["splits"]["test"]["shards"][0].update(file="../elsewhere.arrow"),
     "shard 0 of split 'test' is '../elsewhere.arrow', not test/data-\\*-of-\\*.arrow"),
])
def test_a_manifest_lacking_its_structure_is_one_error_naming_it(tmp_path, prepared, damage, problem):
    copy = copied(prepared["a"], tmp_path)
    recorded = manifest(copy)
    damage(recorded)
    (copy / PREPARED_MANIFEST).write_text(json.dumps(recorded))
    with pytest.raises(ValueError, match=rf"{copy / PREPARED_MANIFEST} is not a whole prepared-folder manifest "
                                         rf"\({problem}\)") as error:
        load(copy)
    assert f"--output_dir {copy} --overwrite true" in str(error.value)


def test_a_folder_prepared_before_fingerprints_is_read_as_before(tmp_path, prepared, capsys):
    copy = copied(prepared["a"], tmp_path)
    recorded = manifest(copy)
    recorded.pop("fingerprint")
    for split in recorded["splits"].values():
        for shard in split["shards"]:
            shard.pop("sha256"), shard.pop("ends_sha256")
    (copy / PREPARED_MANIFEST).write_text(json.dumps(recorded))
    train, evaluation = load(copy)
    assert (len(train), len(evaluation)) == (48, 16)
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note:")]
    assert notes == [f"note: {copy} was prepared by an earlier mae_hf, without fingerprints: its shards are checked "
                     "by their sizes only, and a resume cannot tell whether it was prepared again."]


def test_resume_refuses_a_folder_prepared_again(tmp_path, scripts, sources):
    data = prepare(scripts, sources["a"], tmp_path / "data")
    output = tmp_path / "run"
    args = ["--output_dir", str(output), "--dataset_name", str(data), "--config_overrides", TINY,
            "--per_device_train_batch_size", "8", "--num_train_epochs", "1", "--save_steps", "3", "--knn_eval",
            "false", "--disable_tqdm", "true"]
    scripts.pretrain.main(args)
    recorded = json.loads((output / SETTINGS_NAME).read_text())["data"]["prepared_fingerprint"]
    assert recorded == manifest(data)["fingerprint"]
    resume = [*args, "--resume_from_checkpoint", "last"]
    scripts.pretrain.main(resume)  # the same folder: nothing changed, nothing left to train
    for source, flags in ((sources["a"], ["--short_side", "10"]), (sources["b"], [])):  # another size; other images
        prepare(scripts, source, data, "--overwrite", "true", *flags)
        with pytest.raises(RunError, match=rf"with different settings: data.prepared_fingerprint: '{recorded}' in "
                                           r"the checkpoint, '[0-9a-f]{64}' now"):
            scripts.pretrain.main(resume)
    scripts.pretrain.main([*resume, "--allow_config_change", "true"])
    changed = json.loads((output / SETTINGS_NAME).read_text())["resumes"][-1]["changed"]
    assert changed == {"data.prepared_fingerprint": {"checkpoint": recorded, "now": manifest(data)["fingerprint"]}}

"""Data loading shared by all scripts: sources, splits, columns, decoding, batch transforms."""

import datasets
import pytest
import torch

from mae_hf.data import (
    ArrayDataset,
    BatchTransform,
    DataArguments,
    collate,
    load_image_splits,
    random_resized_crop,
)


def test_parquet_folder_uses_train_and_test_splits(parquet_folder):
    train, evaluation = load_image_splits(DataArguments(dataset_name=str(parquet_folder)), image_size=8)
    assert train.images.shape == (48, 3, 8, 8) and train.images.dtype == torch.uint8
    assert evaluation.images.shape == (16, 3, 8, 8)
    assert train.class_names == ["cat", "dog", "ship"]
    assert train.labels.tolist() == list(range(3)) * 16
    assert (train.split, evaluation.split) == ("train", "test")


def test_every_image_mode_becomes_rgb(parquet_folder):
    train, _ = load_image_splits(DataArguments(dataset_name=str(parquet_folder)), image_size=8)
    grey = train.images[1]  # the fixture makes image 1 (of every 4) a mode "L" image
    assert torch.equal(grey[0], grey[1]) and torch.equal(grey[1], grey[2])
    assert not torch.equal(train.images[0][0], train.images[0][1])  # RGB stays colour


def test_held_out_split_is_fixed_and_disjoint(parquet_folder):
    args = DataArguments(dataset_name=str(parquet_folder / "train.parquet"), validation_split_percentage=25)
    train, evaluation = load_image_splits(args, image_size=8)
    again_train, again_eval = load_image_splits(args, image_size=8)
    assert (len(train), len(evaluation)) == (36, 12)
    assert torch.equal(evaluation.images, again_eval.images) and torch.equal(train.images, again_train.images)
    train_rows = {bytes(image.flatten().tolist()) for image in train.images}
    assert not any(bytes(image.flatten().tolist()) in train_rows for image in evaluation.images)
    assert "25% of train held out, seed 42" in evaluation.split
    other = load_image_splits(DataArguments(dataset_name=str(parquet_folder / "train.parquet"),
                                            validation_split_percentage=25, split_seed=1), image_size=8)[1]
    assert not torch.equal(other.images, evaluation.images)


def test_validation_percentage_overrides_an_existing_test_split(parquet_folder):
    train, evaluation = load_image_splits(
        DataArguments(dataset_name=str(parquet_folder), validation_split_percentage=50), image_size=8)
    assert (len(train), len(evaluation)) == (24, 24)


def test_max_samples(parquet_folder):
    args = DataArguments(dataset_name=str(parquet_folder), max_train_samples=5, max_eval_samples=3)
    train, evaluation = load_image_splits(args, image_size=8)
    assert (len(train), len(evaluation)) == (5, 3)


def test_imagefolder_and_save_to_disk(tmp_path, parquet_folder):
    raw = datasets.load_dataset(str(parquet_folder))
    for split in ("train", "test"):
        for index, row in enumerate(raw[split]):
            folder = tmp_path / "tree" / split / raw[split].features["label"].names[row["label"]]
            folder.mkdir(parents=True, exist_ok=True)
            row["img"].convert("RGB").save(folder / f"{index}.png")
    train, evaluation = load_image_splits(DataArguments(dataset_name=str(tmp_path / "tree")), image_size=8)
    assert (len(train), len(evaluation)) == (48, 16) and train.class_names == ["cat", "dog", "ship"]

    raw.save_to_disk(str(tmp_path / "dict"))
    train, evaluation = load_image_splits(DataArguments(dataset_name=str(tmp_path / "dict")), image_size=8)
    assert (len(train), len(evaluation)) == (48, 16)
    raw["train"].save_to_disk(str(tmp_path / "single"))
    train, evaluation = load_image_splits(DataArguments(dataset_name=str(tmp_path / "single")), image_size=8)
    assert len(train) + len(evaluation) == 48


@pytest.mark.parametrize("flag, value, listed", [
    ("image_column_name", "picture_of", "'img', 'label'"),
    ("label_column_name", "class_id", "'img', 'label'"),
    ("train_split", "training", "'train', 'test'"),
    ("eval_split", "validation", "'train', 'test'"),
])
def test_bad_flags_list_what_exists(parquet_folder, flag, value, listed):
    args = DataArguments(dataset_name=str(parquet_folder), **{flag: value})
    with pytest.raises(ValueError) as error:
        load_image_splits(args, image_size=8, require_labels=True)
    assert value in str(error.value) and listed in str(error.value)


def test_missing_path_is_named_with_what_exists(tmp_path):
    (tmp_path / "cifar10").mkdir()
    with pytest.raises(ValueError, match="nothing: no such file or folder.*holds: cifar10"):
        load_image_splits(DataArguments(dataset_name=str(tmp_path / "nothing")), image_size=8)


def test_parquet_without_hugging_face_metadata(tmp_path, parquet_folder):
    """Parquet written by other tools stores images as plain {bytes, path} structs."""
    import pyarrow.parquet as pq

    table = pq.read_table(parquet_folder / "train.parquet")
    pq.write_table(table.replace_schema_metadata(None), tmp_path / "train.parquet")
    assert not isinstance(datasets.load_dataset("parquet", data_files=str(tmp_path / "train.parquet"))["train"]
                          .features["img"], datasets.Image)
    train, _ = load_image_splits(DataArguments(dataset_name=str(tmp_path)), image_size=8)
    reference, _ = load_image_splits(DataArguments(dataset_name=str(parquet_folder), validation_split_percentage=5),
                                     image_size=8)
    assert torch.equal(train.images, reference.images)


def test_eval_transform_normalises_exactly():
    images = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    transform = BatchTransform(8, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
    expected = (images.float() / 255 - torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1)) / torch.tensor(
        [0.2, 0.25, 0.3]).view(1, 3, 1, 1)
    torch.testing.assert_close(transform(images), expected)
    with pytest.raises(ValueError, match="uint8"):
        transform(images.float())


def test_random_resized_crop_geometry():
    images = torch.rand(6, 3, 8, 8)
    whole = random_resized_crop(images, 8, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    torch.testing.assert_close(whole, images)  # the full crop is the identity
    flipped = random_resized_crop(images, 8, scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=True)
    for original, result in zip(images, flipped):
        assert torch.allclose(result, original) or torch.allclose(result, original.flip(-1))
    torch.manual_seed(0)
    crops = random_resized_crop(images, 4, scale=(0.2, 0.5))
    assert crops.shape == (6, 3, 4, 4) and not torch.allclose(crops, images[:, :, ::2, ::2])


def test_crop_of_a_constant_region_keeps_its_value():
    images = torch.zeros(3, 1, 16, 16)
    images[:, :, :, :] = 0.7
    torch.testing.assert_close(random_resized_crop(images, 8, scale=(0.2, 1.0), hflip=True),
                               torch.full((3, 1, 8, 8), 0.7))


def test_array_dataset_fetches_whole_batches():
    dataset = ArrayDataset(torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1), labels=torch.arange(10) * 2)
    batch = collate(dataset.__getitems__([3, 1, 4]))
    assert batch["pixel_values"].flatten().tolist() == [3, 1, 4] and batch["labels"].tolist() == [6, 2, 8]
    items = collate([dataset[0], dataset[5]])  # loaders that fetch one item at a time
    assert items["labels"].tolist() == [0, 10]
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, collate_fn=collate)
    assert [len(b["labels"]) for b in loader] == [4, 4, 2]

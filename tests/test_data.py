"""Data loading shared by all scripts: sources, splits, columns, decoding, batch transforms."""

import math

import datasets
import numpy as np
import pytest
import torch
from fixtures_runs import image_tree

from mae_hf.data import BatchTransform, DataArguments, ImageDataset, collate, load_image_splits
from mae_hf.data.memory import InMemoryImages
from mae_hf.data.transforms import center_crop, random_resized_crop


def test_parquet_folder_uses_train_and_test_splits(parquet_folder):
    train, evaluation = load_image_splits(DataArguments(dataset_name=str(parquet_folder)), image_size=8)
    # 12 x 12 images stored at short side 9 for an 8 px model: room for the evaluation's centre crop of 8
    assert train.images.shape == (48, 3, 9, 9) and train.images.dtype == torch.uint8
    assert evaluation.images.shape == (16, 3, 9, 9) and train.short_side == 9
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


def test_crops_stay_inside_each_images_own_pixels():
    """Canvases hold images of other sizes (the rest repeats their edge): bilinear sampling reaches at most the
    repeated row and column next to an image, never further, and the whole-image crop of a smaller image is that
    image, resampled."""
    canvas = torch.zeros(2, 1, 16, 16)
    canvas[0, :, :9, :13] = 0.25  # an 8 x 12 image and its repeated edge; beyond, another value
    canvas[0, :, 9:, :] = 0.9
    canvas[0, :, :, 13:] = 0.9
    canvas[1] = 0.25  # a full 16 x 16 image
    sizes = torch.tensor([[8, 12], [16, 16]])
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        crops = random_resized_crop(canvas, 8, sizes, scale=(0.08, 1.0), hflip=True, generator=generator)
        torch.testing.assert_close(crops, torch.full_like(crops, 0.25))
    image = torch.arange(8 * 12, dtype=torch.float32).view(1, 1, 8, 12)
    padded = torch.nn.functional.pad(image, (0, 4, 0, 8), mode="replicate")
    whole = random_resized_crop(padded, 8, torch.tensor([[8, 12]]), scale=(1.0, 1.0), ratio=(1.5, 1.5))
    expected = torch.nn.functional.interpolate(image, size=(8, 8), mode="bilinear", align_corners=False)
    torch.testing.assert_close(whole, expected)


def reference_crop_areas(count: int, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3), seed: int = 1) -> np.ndarray:
    """Area fractions of torchvision's RandomResizedCrop on a square image, one crop at a time: up to 10 draws of
    an area in `scale` and a log-uniform aspect, the first that fits wins, else the whole image."""
    rng, areas = np.random.default_rng(seed), []
    for _ in range(count):
        for _ in range(10):
            area = rng.uniform(*scale)
            aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
            width, height = math.sqrt(area * aspect), math.sqrt(area / aspect)
            if width <= 1 and height <= 1:
                areas.append(width * height)
                break
        else:
            areas.append(1.0)
    return np.asarray(areas)


def test_crops_follow_torchvisions_distribution():
    """Area fraction and aspect as torchvision draws them (redraws, not clipping), measured from the crops'
    grid."""
    images = torch.rand(4000, 1, 32, 32)
    theta = []
    original = torch.nn.functional.affine_grid

    def record(matrix, *args, **kwargs):
        theta.append(matrix.clone())
        return original(matrix, *args, **kwargs)

    torch.nn.functional.affine_grid, generator = record, torch.Generator().manual_seed(0)
    try:
        random_resized_crop(images, 4, scale=(0.2, 1.0), generator=generator)
    finally:
        torch.nn.functional.affine_grid = original
    width, height = theta[0][:, 0, 0], theta[0][:, 1, 1]
    area, aspect = width * height, (width / height).log()
    assert 0.2 - 1e-6 <= area.min() and area.max() <= 1 + 1e-6
    reference = reference_crop_areas(4000)
    assert abs(area.mean().item() - reference.mean()) < 0.015
    assert abs(np.quantile(area.numpy(), 0.9) - np.quantile(reference, 0.9)) < 0.03
    assert aspect.min() >= math.log(3 / 4) - 1e-5 and aspect.max() <= math.log(4 / 3) + 1e-5


def test_same_generator_state_same_batch_whatever_else_draws():
    transform = BatchTransform(8, [0.5] * 3, [0.25] * 3, crop_scale=(0.2, 1.0), hflip=True, seed=3)
    images = torch.randint(0, 256, (4, 3, 12, 12), dtype=torch.uint8)
    first = transform(images)
    state = transform.state()
    second = transform(images)
    again = BatchTransform(8, [0.5] * 3, [0.25] * 3, crop_scale=(0.2, 1.0), hflip=True, seed=3)
    torch.manual_seed(123)  # the global random state plays no part
    torch.testing.assert_close(again(images), first)
    again.load_state(state)
    torch.testing.assert_close(again(images), second)


def test_center_crop_takes_the_middle_of_each_image():
    canvas = torch.zeros(2, 1, 8, 12)
    canvas[0, 0, :8, :12] = torch.arange(96, dtype=torch.float32).view(8, 12)
    canvas[1, 0, :4, :4] = torch.arange(16, dtype=torch.float32).view(4, 4)
    crops = center_crop(canvas, 4, torch.tensor([[8, 12], [4, 4]]), fraction=0.5)
    torch.testing.assert_close(crops[0, 0], canvas[0, 0, 2:6, 4:8])
    small = torch.nn.functional.interpolate(canvas[1:, :, 1:3, 1:3], size=(4, 4), mode="bicubic", antialias=True)
    torch.testing.assert_close(crops[1:], small)
    same = center_crop(canvas[:, :, :8, :8], 8)
    assert same is not None and same.shape == (2, 1, 8, 8)


def test_crop_of_a_constant_region_keeps_its_value():
    images = torch.zeros(3, 1, 16, 16)
    images[:, :, :, :] = 0.7
    torch.testing.assert_close(random_resized_crop(images, 8, scale=(0.2, 1.0), hflip=True),
                               torch.full((3, 1, 8, 8), 0.7))


def test_image_dataset_fetches_whole_batches():
    images = torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1)
    data = InMemoryImages(images, torch.ones(10, 2, dtype=torch.int32), labels=torch.arange(10) * 2)
    dataset = ImageDataset(data, labels=True)
    batch = collate(dataset.__getitems__([3, 1, 4]))
    assert batch["pixel_values"].flatten().tolist() == [3, 1, 4] and batch["labels"].tolist() == [6, 2, 8]
    assert batch["image_sizes"].tolist() == [[1, 1]] * 3
    items = collate([dataset[0], dataset[5]])  # loaders that fetch one item at a time
    assert items["labels"].tolist() == [0, 10]
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, collate_fn=collate)
    assert [len(b["labels"]) for b in loader] == [4, 4, 2]


def test_packed_images_read_as_canvases_do():
    """Images of very different sizes are stored packed (no canvas padding in memory) and pasted onto canvases
    when read; the one-gather edge repetition used on GPUs gives the same canvases."""
    from mae_hf.data.memory import repeat_edges

    generator = torch.Generator().manual_seed(0)
    shapes = [(3, 4, 9), (3, 9, 4), (3, 2, 2)]
    pictures = [torch.randint(0, 256, shape, dtype=torch.uint8, generator=generator) for shape in shapes]
    canvases = torch.zeros(3, 3, 9, 9, dtype=torch.uint8)
    for canvas, picture in zip(canvases, pictures):
        h, w = picture.shape[1:]
        canvas[:, :h, :w] = picture
    sizes = torch.tensor([shape[1:] for shape in shapes], dtype=torch.int32)
    dense = InMemoryImages(repeat_edges(canvases, sizes), sizes, labels=torch.arange(3))
    packed = torch.cat([picture.flatten() for picture in pictures])
    offsets = np.cumsum([0] + [picture.numel() for picture in pictures[:-1]])
    stored = InMemoryImages(None, sizes, labels=torch.arange(3), packed=packed, offsets=offsets, canvas=(3, 9, 9))
    assert stored.decoded_bytes == packed.numel() < dense.decoded_bytes
    for positions in ([0, 1, 2], [2, 0], [1]):
        assert torch.equal(stored.read(positions)[0], dense.read(positions)[0])
    subset = stored.subset(torch.tensor([2, 1]))
    assert torch.equal(subset.read([0, 1])[0], dense.read([2, 1])[0]) and subset.labels.tolist() == [2, 1]
    assert torch.equal(dense.images[0, :, 4:, :9], dense.images[0, :, 3:4, :9].expand(-1, 5, -1))


def test_a_training_transform_without_random_crops_never_reads_device_values():
    """--crop_min_scale 1 trains on the centre crop: bilinear in one grid_sample, no host read of the crop sizes
    (on a GPU that would wait for the device every step); evaluation's antialiased crop may group on the host."""
    ramp = torch.arange(16).view(1, 1, 16) * 8 + torch.arange(12).view(1, 12, 1) * 4  # smooth: both resamplings agree
    images = ramp.expand(4, 3, 12, 16).to(torch.uint8)
    sizes = torch.tensor([[12, 16], [10, 10], [12, 12], [9, 16]])
    training = BatchTransform(8, [0.5] * 3, [0.25] * 3, eval_crop_fraction=0.875, training=True)
    meta = training(images.to("meta"), sizes.to("meta"))  # meta tensors have no values: any host read fails
    assert meta.shape == (4, 3, 8, 8)
    evaluation = BatchTransform(8, [0.5] * 3, [0.25] * 3, eval_crop_fraction=0.875)
    torch.testing.assert_close(training(images, sizes), evaluation(images, sizes), atol=0.2, rtol=0)


def image_tree6(root, paths):
    return image_tree(root, paths, size=(6, 6))


def test_a_tree_of_split_folders_given_as_one_split_is_refused(tmp_path):
    from mae_hf.cli import UsageError
    from mae_hf.data.sources import load_raw_dataset

    tree = image_tree6(tmp_path / "tree", ["train/cat/0.png", "train/dog/1.png", "val/cat/2.png", "val/dog/3.png"])
    with pytest.raises(UsageError, match=rf"--train_dir {tree} holds split folders \(train, val\).*read as classes "
                                         rf"named train and val. Pass --train_dir {tree}/train --validation_dir "
                                         rf"{tree}/val \(or --dataset_name {tree}\)"):
        load_raw_dataset(DataArguments(train_dir=str(tree)))
    with pytest.raises(UsageError, match=rf"Pass --validation_dir {tree}/val"):
        load_raw_dataset(DataArguments(train_dir=str(tree / "train"), validation_dir=str(tree)))
    # Real classes named like splits hold their images (or folders of them), not class folders: no false alarm.
    classes = image_tree6(tmp_path / "classes", ["test/0.png", "train/steam/1.png", "train/2.png"])
    assert load_raw_dataset(DataArguments(train_dir=str(classes)))["train"].features["label"].names == [
        "test", "train"]


def test_a_stray_file_beside_a_split_s_class_folders_keeps_it_a_class_tree(tmp_path, capsys):
    from mae_hf.data.sources import load_raw_dataset

    tree = image_tree6(tmp_path / "tree", ["train/cat/0.png", "train/dog/1.png", "test/cat/2.png", "test/dog/3.png"])
    (tree / "train" / "classes.txt").write_text("cat\ndog\n")
    for args in (DataArguments(dataset_name=str(tree)), DataArguments(train_dir=str(tree / "train"))):
        split = load_raw_dataset(args)["train"]  # listed here (undecoded images), not by datasets' imagefolder
        assert split.features["label"].names == ["cat", "dog"] and split["label"] == [0, 1]
        assert split.features["image"].decode is False
        assert (f"note: {tree}/train: 1 file(s) beside the class folders are not images and are left out: "
                "classes.txt") in capsys.readouterr().err


def test_a_first_class_folder_without_images_keeps_the_labels(tmp_path):
    from mae_hf.data.sources import load_raw_dataset

    nest = image_tree6(tmp_path / "nest", ["train/aaa/", "train/bbb/0.png", "train/bbb/1.png", "train/ccc/deep/2.png"])
    for args in (DataArguments(dataset_name=str(nest)), DataArguments(train_dir=str(nest / "train"))):
        split = load_raw_dataset(args)["train"]
        assert split.features["label"].names == ["aaa", "bbb", "ccc"] and split["label"] == [1, 1, 2]
    deep = image_tree6(tmp_path / "deep", ["train/aaa/sub/0.png", "train/bbb/1.png"])
    assert load_raw_dataset(DataArguments(dataset_name=str(deep)))["train"]["label"] == [0, 1]


def test_a_folder_inside_a_prepared_folder_and_a_link_loop_are_named(tmp_path):
    from mae_hf.cli import UsageError
    from mae_hf.data.prepared import PREPARED_MANIFEST
    from mae_hf.data.sources import load_raw_dataset

    prepared = tmp_path / "p32"
    (prepared / "train").mkdir(parents=True)
    (prepared / PREPARED_MANIFEST).write_text("{}")
    with pytest.raises(UsageError, match=rf"--dataset_name {prepared}/train lies inside the prepared folder "
                                         rf"{prepared} .*Pass --dataset_name {prepared}"):
        load_raw_dataset(DataArguments(dataset_name=str(prepared / "train")))
    with pytest.raises(UsageError, match=rf"--train_dir {prepared} is a prepared folder .*Pass --dataset_name"):
        load_raw_dataset(DataArguments(train_dir=str(prepared)))
    looped = image_tree6(tmp_path / "looped", ["a/0.png", "b/1.png"])
    (looped / "b" / "back").symlink_to("../b")
    with pytest.raises(ValueError, match=r"b/back is a symbolic link to .*b, a folder that holds the link.*Remove"):
        load_raw_dataset(DataArguments(train_dir=str(looped)))


def test_disable_tqdm_silences_the_decoding_bars_and_both_folders_are_named(tmp_path, capsys):
    tree = image_tree6(tmp_path, ["train/a/0.png", "train/b/1.png", "val/a/2.png", "val/b/3.png"])
    data = DataArguments(train_dir=str(tree / "train"), validation_dir=str(tree / "val"), data_in_memory="true")
    load_image_splits(data, 8, progress=False)
    printed = capsys.readouterr()
    assert "Decoding images" not in printed.err
    assert f"images of {tree}/train and {tree}/val" in printed.out
    load_image_splits(data, 8)
    assert "Decoding images (train)" in capsys.readouterr().err


def largest_float_tensor(function, *args):
    """(`function(*args)`, the most elements of any floating-point tensor an operation made while it ran)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Largest(TorchDispatchMode):
        numel = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            result = func(*args, **(kwargs or {}))
            for tensor in result if isinstance(result, (tuple, list)) else [result]:
                if isinstance(tensor, torch.Tensor) and tensor.is_floating_point():
                    Largest.numel = max(Largest.numel, tensor.numel())
            return result

    with Largest():
        result = function(*args)
    return result, Largest.numel


def test_canvases_become_floats_only_as_they_are_cropped(monkeypatch):
    """Large canvases (mostly padding around the images) are never converted to floats as a whole batch: the crops
    are sampled a few canvases at a time, the evaluation's centre crops cut out as uint8; the results are those of
    converting everything first."""
    from mae_hf.data import transforms

    canvases = torch.randint(0, 256, (16, 3, 64, 64), dtype=torch.uint8)
    sizes = torch.tensor([[40, 60], [60, 40]] * 8)
    whole_batch = canvases.numel()
    monkeypatch.setattr(transforms, "FLOAT_CHUNK_BYTES", 2 * 4 * 3 * 64 * 64)  # two canvases at a time
    train = BatchTransform(8, [0.5] * 3, [0.25] * 3, crop_scale=(0.2, 1.0), hflip=True, seed=3, training=True)
    crops, largest = largest_float_tensor(train, canvases, sizes.numpy())
    assert largest <= 2 * 3 * 64 * 64
    reference = BatchTransform(8, [0.5] * 3, [0.25] * 3, crop_scale=(0.2, 1.0), hflip=True, seed=3, training=True)
    monkeypatch.setattr(transforms, "FLOAT_CHUNK_BYTES", 2**40)  # everything at once, as before
    torch.testing.assert_close(crops, reference(canvases, sizes), rtol=0, atol=0)
    evaluation = BatchTransform(8, [0.5] * 3, [0.25] * 3, eval_crop_fraction=0.875)
    centre, largest = largest_float_tensor(evaluation, canvases, sizes.numpy())
    assert largest <= 16 * 3 * 35 * 35 < whole_batch / 3  # the crops (0.875 of 40), not the canvases
    expected = center_crop(canvases.float() / 255, 8, sizes, fraction=0.875)
    torch.testing.assert_close(centre, (expected - 0.5) / 0.25)

"""The strong fine-tuning recipe (mae_hf/augment.py): each operation against PIL or its definition, determinism,
mixup/cutmix targets, random erasing, repeated augmentation, the weight EMA, the trainer's soft-target loss and a
tiny fine-tune with every option on."""

import json
import math
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageEnhance, ImageOps

from mae_hf import MAEForImageClassification
from mae_hf.augment import (
    COLOUR_OPS,
    MAX_TRANSLATE,
    OPS,
    MixupCutmix,
    RandAugment,
    RepeatedAugmentationSampler,
    WeightEMA,
    _affine,
    _colour_op,
    autocontrast,
    brightness,
    color,
    contrast,
    equalize,
    posterize,
    sharpness,
    smooth_one_hot,
    soft_target_cross_entropy,
    solarize,
    warp,
)
from mae_hf.data import BatchTransform
from mae_hf.data.transforms import random_erasing


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture
def images():
    """Four 16x16 RGB images on the uint8 grid, with a narrow range (so autocontrast and equalize have work)."""
    levels = torch.randint(40, 200, (4, 3, 16, 16), generator=generator(0))
    return levels.float() / 255


def pil(image: torch.Tensor) -> Image.Image:
    return Image.fromarray((image.permute(1, 2, 0) * 255).round().byte().numpy())


def from_pil(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255


@pytest.mark.parametrize("name, ours, theirs, tolerance", [
    ("equalize", equalize, ImageOps.equalize, 0),
    ("autocontrast", autocontrast, ImageOps.autocontrast, 1),
    ("posterize 3 bits", lambda x: posterize(x, torch.tensor([3.0])), lambda i: ImageOps.posterize(i, 3), 0),
    ("solarize at 0.5", lambda x: solarize(x, torch.tensor([128 / 255])), lambda i: ImageOps.solarize(i, 128), 0),
    ("brightness 1.6", lambda x: brightness(x, torch.tensor([1.6])), lambda i: ImageEnhance.Brightness(i).enhance(1.6),
     1),
    ("color 0.3", lambda x: color(x, torch.tensor([0.3])), lambda i: ImageEnhance.Color(i).enhance(0.3), 2),
    ("contrast 1.8", lambda x: contrast(x, torch.tensor([1.8])), lambda i: ImageEnhance.Contrast(i).enhance(1.8), 2),
    ("sharpness 1.9", lambda x: sharpness(x, torch.tensor([1.9])), lambda i: ImageEnhance.Sharpness(i).enhance(1.9),
     2),  # PIL rounds the smoothed image to 8 bits before blending
])
def test_colour_ops_match_pil(images, name, ours, theirs, tolerance):
    for image in images:
        result = ours(image[None])[0]
        assert result.shape == image.shape and result.dtype == torch.float32
        expected = from_pil(theirs(pil(image)))
        assert (result * 255 - expected * 255).abs().max() <= tolerance + 1e-3, name


@pytest.mark.parametrize("name", OPS)
def test_every_op_keeps_shape_dtype_and_range(images, name):
    level, sign = torch.full((4,), 0.9), torch.tensor([1.0, -1.0, 1.0, -1.0])
    op = torch.full((4,), OPS.index(name))
    if name in COLOUR_OPS:
        result = _colour_op(name, images, level, sign)
    else:
        result = warp(images, _affine(op, level, sign))
    assert result.shape == images.shape and result.dtype == torch.float32
    assert result.min() >= 0 and result.max() <= 1
    assert torch.equal(result, images) == (name == "identity"), name


def test_nothing_reads_device_values_on_the_host():
    """On the meta device tensors have no values: any `.item()`, `bool(tensor)` or data-dependent shape would fail
    here, as it would make a GPU step wait."""
    meta = torch.empty(28, 3, 16, 16, device="meta")
    level, sign = torch.full((28,), 0.5, device="meta"), torch.ones(28, device="meta")
    for name in COLOUR_OPS:
        assert _colour_op(name, meta, level, sign).shape == meta.shape, name
    augment = RandAugment(num_ops=1)
    op, host_level, host_sign = augment.draw(28, generator(0))
    op[:14] = torch.arange(14)  # every op
    augment.colour_round_(meta, op, host_level, host_sign)
    transform = BatchTransform(16, [0.5] * 3, [0.25] * 3, crop_scale=(0.25, 1), hflip=True, augment=RandAugment(),
                               random_erasing=0.25)
    pixels = transform(torch.empty(28, 3, 16, 16, dtype=torch.uint8, device="meta"))
    labels = torch.empty(28, dtype=torch.long, device="meta")
    for mixer in (MixupCutmix(3, cutmix_alpha=0.0), MixupCutmix(3, mixup_alpha=0.0)):
        mixed, targets = mixer(pixels, labels)
        assert mixed.shape == pixels.shape and targets.shape == (28, 3)
    ema = WeightEMA(0.9999)
    ema.start(torch.nn.Linear(2, 2, device="meta"))
    ema.update()


def test_translation_shifts_by_whole_pixels_and_fills_grey(images):
    # A shift of 4 of 16 pixels: the output's column j shows the input's column j + 4.
    matrix = _affine(torch.tensor([OPS.index("translate_x")]), torch.tensor([0.25 / MAX_TRANSLATE]),
                     torch.tensor([1.0]))
    result = warp(images[:1], matrix)
    torch.testing.assert_close(result[..., :-4], images[:1, ..., 4:], atol=1e-5, rtol=0)
    torch.testing.assert_close(result[..., -4:], torch.full_like(result[..., -4:], 0.5), atol=1e-5, rtol=0)
    identity = warp(images, torch.eye(3).expand(4, 3, 3))
    torch.testing.assert_close(identity, images, atol=1e-5, rtol=0)


def test_randaugment_applies_to_each_sample_the_op_it_drew(images):
    batch = torch.rand(28, 3, 16, 16, generator=generator(1))
    augment = RandAugment(num_ops=1, magnitude=9)
    op, level, sign = augment.draw(28, generator(2))
    op[:14] = torch.arange(14)  # every op at least once
    grouped = augment.colour_round_(batch.clone(), op, level, sign)
    for i in range(28):
        name, one = OPS[op[i]], slice(i, i + 1)
        alone = _colour_op(name, batch[one], level[one], sign[one]) if name in COLOUR_OPS else batch[one]
        torch.testing.assert_close(grouped[i:i + 1], alone, msg=name)


def test_randaugment_op_prob_turns_ops_into_the_identity():
    always = RandAugment(num_ops=1, op_prob=1.0).draw(4000, generator(3))[0]
    half = RandAugment(num_ops=1, op_prob=0.5).draw(4000, generator(3))[0]
    identity = OPS.index("identity")
    assert (always == identity).float().mean() < 0.1  # 1 in 14 ops is the identity
    assert 0.5 < (half == identity).float().mean() < 0.6  # half skipped, plus the drawn identities
    with pytest.raises(ValueError, match="op_prob"):
        RandAugment(op_prob=1.5)


def test_each_process_trains_on_its_own_random_stream():
    from mae_hf.training import PerProcessSeed

    draws = []
    for rank in (0, 1):
        args = SimpleNamespace(world_size=2, process_index=rank, seed=42)
        PerProcessSeed().on_train_begin(args, None, None)
        draws.append(torch.rand(4))
    assert not torch.equal(draws[0], draws[1])
    single = SimpleNamespace(world_size=1, process_index=0, seed=42)
    torch.manual_seed(7)
    expected = torch.rand(4)
    torch.manual_seed(7)
    PerProcessSeed().on_train_begin(single, None, None)  # one process: the stream set_seed started is kept
    assert torch.equal(torch.rand(4), expected)


@pytest.mark.parametrize("augment", [RandAugment(2, 9, 0.5), RandAugment(trivial=True)], ids=repr)
def test_randaugment_is_deterministic_for_a_seed(images, augment):
    first, again, other = (augment(images, generator(seed)) for seed in (3, 3, 4))
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert first.shape == images.shape and first.dtype == torch.float32 and 0 <= first.min() and first.max() <= 1


def test_batch_transform_pipeline_is_deterministic_for_a_seed():
    uint8 = torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8, generator=generator(5))
    outputs = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)  # what transformers.set_seed does for the trainer (the ops after the crop)
        transform = BatchTransform(16, [0.5] * 3, [0.25] * 3, crop_scale=(0.25, 1), hflip=True,
                                   augment=RandAugment(), random_erasing=0.25, seed=seed)  # the crops' own stream
        outputs.append(transform(uint8))
    assert torch.equal(outputs[0], outputs[1]) and not torch.equal(outputs[0], outputs[2])


def test_random_erasing_replaces_one_rectangle_with_noise(images):
    erased = random_erasing(images, probability=1.0, generator=generator(6))
    assert erased.shape == images.shape and erased.dtype == images.dtype
    for before, after in zip(images, erased):
        changed = (before != after).all(0)  # noise differs in every channel
        rows, cols = changed.any(1).nonzero().flatten(), changed.any(0).nonzero().flatten()
        height, width = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
        assert changed.sum() == height * width  # a full rectangle
        assert 0.02 * 256 * 0.5 <= changed.sum() <= 256 / 3 * 1.5  # area fraction in [0.02, 1/3], up to rounding
    assert torch.equal(random_erasing(images, probability=0.0), images)
    assert torch.equal(random_erasing(images, 1.0, generator=generator(6)), erased)


def test_mixup_mixes_images_and_targets_by_lambda(images):
    mixer = MixupCutmix(num_labels=3, mixup_alpha=0.8, cutmix_alpha=0.0, label_smoothing=0.1)
    labels = torch.tensor([0, 1, 2, 0])
    lam, box = mixer.draw(16, 16, generator(7))
    mixed, targets = mixer(images, labels, generator(7))
    assert box is None and 0 < lam < 1
    torch.testing.assert_close(mixed, lam * images + (1 - lam) * images.flip(0))
    smooth = smooth_one_hot(labels, 3, 0.1)
    torch.testing.assert_close(targets, lam * smooth + (1 - lam) * smooth.flip(0))
    torch.testing.assert_close(targets.sum(1), torch.ones(4))


def test_cutmix_targets_match_the_pasted_area(images):
    mixer = MixupCutmix(num_labels=3, mixup_alpha=0.0, cutmix_alpha=1.0, label_smoothing=0.0)
    labels = torch.tensor([0, 1, 2, 1])
    for seed in range(5):
        mixed, targets = mixer(images, labels, generator(seed))
        torch.testing.assert_close(targets.sum(1), torch.ones(4))
        pasted = (mixed != images).any(1).float().mean(dim=(1, 2))  # the images differ at every pixel
        from_partner = torch.stack([targets[i, labels.flip(0)[i]] for i in range(4)])
        # every image's partner has another label: its target weight is the pasted area
        torch.testing.assert_close(from_partner, pasted)


def test_mixup_off_keeps_images_and_smooths_labels(images):
    mixer = MixupCutmix(num_labels=3, mixup_alpha=0.8, cutmix_alpha=1.0, prob=0.0, label_smoothing=0.1)
    mixed, targets = mixer(images, torch.tensor([0, 1, 2, 0]))
    assert torch.equal(mixed, images)
    assert torch.allclose(targets[0], torch.tensor([0.9 + 0.1 / 3, 0.1 / 3, 0.1 / 3]))


def test_mixup_cutmix_is_deterministic_for_a_seed(images):
    mixer = MixupCutmix(num_labels=3)
    labels = torch.tensor([0, 1, 2, 0])
    (a, ta), (b, tb) = (mixer(images, labels, generator(8)) for _ in range(2))
    assert torch.equal(a, b) and torch.equal(ta, tb)


def test_soft_target_cross_entropy_equals_label_smoothing_for_hard_labels():
    logits, labels = torch.randn(5, 4, generator=generator(9)), torch.tensor([0, 3, 1, 2, 3])
    torch.testing.assert_close(soft_target_cross_entropy(logits, smooth_one_hot(labels, 4, 0.1)),
                               F.cross_entropy(logits, labels, label_smoothing=0.1))


def test_repeated_augmentation_layout():
    sampler = RepeatedAugmentationSampler(10, repeats=3, seed=0)
    order = list(sampler)
    assert len(order) == len(sampler) == 10  # an epoch keeps its length
    assert order[0:9:3] == order[1:9:3] == order[2:9:3]  # each image 3 times in a row
    assert len(set(order)) == 4 and order[9] not in order[:9]  # ceil(10 / 3) distinct images, the last one cut short
    assert list(RepeatedAugmentationSampler(10, 3, seed=0)) == order  # same seed, same order
    sampler.set_epoch(1)
    assert list(sampler) != order


def test_trainer_batches_repeat_each_image(tiny_config, tmp_path):
    from mae_hf.data import ImageDataset, collate
    from mae_hf.data.memory import InMemoryImages
    from mae_hf.training import ImageTrainer
    from mae_hf.training_args import ImageTrainingArguments

    model = MAEForImageClassification(tiny_config(num_labels=3))
    args = ImageTrainingArguments(output_dir=str(tmp_path), eval_strategy="no", per_device_train_batch_size=6)
    transform = BatchTransform.for_model(model.config)
    images = torch.zeros(12, 3, 8, 8, dtype=torch.uint8)
    data = InMemoryImages(images, torch.full((12, 2), 8, dtype=torch.int32), labels=torch.arange(12))
    trainer = ImageTrainer(model=model, args=args, train_dataset=ImageDataset(data, labels=True),
                           data_collator=collate, train_transform=transform, eval_transform=transform,
                           repeated_augmentations=3)
    loader = trainer.get_train_dataloader()
    epochs = []
    for epoch in range(2):
        loader.set_epoch(epoch)  # as the Trainer does at each epoch
        batches = [batch["labels"].tolist() for batch in loader]
        assert len(batches) == 2 and all(len(batch) == 6 for batch in batches)  # 12 samples an epoch
        for batch in batches:
            assert batch[0:3] == [batch[0]] * 3 and batch[3:6] == [batch[3]] * 3
        epochs.append(batches)
    assert epochs[0] != epochs[1]
    assert trainer._get_train_sampler().seed == args.seed
    args.data_seed = 7  # the Trainer's flag for the data order, as its own sampler takes it
    assert trainer._get_train_sampler().seed == 7


def test_repeated_copies_get_different_augmentations():
    uint8 = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8, generator=generator(10))
    transform = BatchTransform(16, [0.5] * 3, [0.25] * 3, crop_scale=(0.25, 1), hflip=True, augment=RandAugment(),
                               random_erasing=0.25)
    copies = transform(uint8[[0, 0, 0]])
    assert not torch.equal(copies[0], copies[1]) and not torch.equal(copies[1], copies[2])


def test_weight_ema_update_and_swap():
    model = torch.nn.Linear(2, 1)
    ema = WeightEMA(decay=0.9999)
    ema.start(model)
    start = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update()  # decay warms up: min(0.9999, (1 + 0) / (10 + 0)) = 0.1
    expected = 0.1 * start + 0.9 * model.weight.detach()
    torch.testing.assert_close(ema.shadow[0], expected)
    assert ema.decay_now() == pytest.approx(2 / 11)
    ema.updates = 10**6
    assert ema.decay_now() == 0.9999
    trained = model.weight.detach().clone()
    with ema.applied():
        torch.testing.assert_close(model.weight.detach(), expected)
    assert torch.equal(model.weight.detach(), trained)


def test_weight_ema_continues_from_a_checkpoint(tmp_path):
    model = torch.nn.Linear(2, 1)
    ema = WeightEMA(decay=0.9)
    ema.start(model)
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update()
    (tmp_path / "checkpoint-5").mkdir()
    state = SimpleNamespace(global_step=5, is_world_process_zero=True)
    ema.on_save(SimpleNamespace(output_dir=str(tmp_path)), state, None)
    resumed = WeightEMA(decay=0.9)
    resumed.on_train_begin(SimpleNamespace(resume_from_checkpoint=str(tmp_path / "checkpoint-5")), state, None,
                           model=model)
    assert resumed.updates == 5 and all(torch.equal(a, b) for a, b in zip(resumed.shadow, ema.shadow))
    assert not torch.equal(resumed.shadow[0], model.weight.detach())  # the average, not the checkpoint's weights


def test_trainer_loss_on_mixed_batches_is_soft_cross_entropy(tiny_config, tmp_path):
    from mae_hf.training import ImageTrainer
    from mae_hf.training_args import ImageTrainingArguments

    model = MAEForImageClassification(tiny_config(num_labels=3))
    args = ImageTrainingArguments(output_dir=str(tmp_path), eval_strategy="no", label_smoothing_factor=0.1)
    transform = BatchTransform.for_model(model.config)
    trainer = ImageTrainer(model=model, args=args, train_transform=transform, eval_transform=transform,
                           mixer=MixupCutmix(3))
    pixels = torch.randn(4, 3, 8, 8, generator=generator(11))
    targets = torch.softmax(torch.randn(4, 3, generator=generator(12)), -1)
    model.eval()  # no drop path: the same logits twice
    loss = trainer.compute_loss(model, {"pixel_values": pixels, "labels": targets})
    torch.testing.assert_close(loss, soft_target_cross_entropy(model(pixels).logits, targets))


@pytest.mark.parametrize("mixer", [None, MixupCutmix(3)], ids=["hard labels", "mixed"])
def test_accumulated_loss_is_divided_by_the_accumulation_steps(tiny_config, tmp_path, mixer):
    """Each micro-batch's loss is a mean over that micro-batch: the Trainer must divide it by the accumulation steps,
    also when its training loop has counted the batch's labels (it passes that count as `num_items_in_batch`)."""
    from mae_hf.training import ImageTrainer
    from mae_hf.training_args import ImageTrainingArguments

    model = MAEForImageClassification(tiny_config(num_labels=3))
    args = ImageTrainingArguments(output_dir=str(tmp_path), eval_strategy="no", gradient_accumulation_steps=2)
    transform = BatchTransform.for_model(model.config)
    trainer = ImageTrainer(model=model, args=args, train_transform=transform, eval_transform=transform, mixer=mixer)
    trainer.current_gradient_accumulation_steps = 2  # what the training loop sets for each optimizer step
    inputs = {"pixel_values": torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8, generator=generator(13)),
              "labels": torch.tensor([0, 1, 2, 0])}
    model.train()
    torch.manual_seed(0)
    mean = trainer.compute_loss(model, trainer._prepare_inputs(dict(inputs)))  # the step's own random draws
    for count in (None, torch.tensor(8)):
        torch.manual_seed(0)
        assert torch.equal(trainer.training_step(model, dict(inputs), num_items_in_batch=count), mean.detach() / 2)


def test_strong_recipe_fine_tune_end_to_end(scripts, parquet_folder, tiny_overrides, tmp_path, repo_root):
    def run(name, *extra):
        scripts.finetune.main([str(repo_root / "configs" / "cpu_small_finetune_strong.yaml"), "--random_init", "true",
                               "--config_overrides", tiny_overrides, "--dataset_name", str(parquet_folder),
                               "--output_dir", str(tmp_path / name), "--per_device_train_batch_size", "12",
                               "--num_train_epochs", "2", "--max_train_samples", "48", "--save_steps", "3",
                               "--disable_tqdm", "true", *extra])
        return json.loads((tmp_path / name / "finetune_results.json").read_text())

    def weights(name):
        return [MAEForImageClassification.from_pretrained(tmp_path / name / folder).state_dict()
                for folder in (".", "ema")]

    def same(a, b):
        return all(torch.equal(x, a[index][key]) for index in range(2) for key, x in b[index].items())

    first, again = run("a"), run("b")
    for key, value in {"augment_policy": "randaugment", "randaugment_num_ops": 2, "randaugment_magnitude": 9,
                       "mixup_alpha": 0.8, "cutmix_alpha": 1.0, "mixup_switch_prob": 0.5, "random_erasing": 0.25,
                       "repeated_augmentations": 3, "ema_decay": 0.9999, "label_smoothing_factor": 0.1}.items():
        assert first[key] == value, key
    assert 0 <= first["eval_accuracy"] <= 1 and 0 <= first["eval_ema_accuracy"] <= 1
    assert math.isfinite(first["eval_loss"]) and first["eval_ema_loss"] != first["eval_loss"]
    trained, averaged = weights("a")
    assert not torch.equal(trained["classifier.weight"], averaged["classifier.weight"])
    # The same seed gives the same run, bit for bit; so does resuming mid-epoch (step 6: halfway through the second
    # of two 4-step epochs) from a checkpoint: RNG states, sampler epoch and the EMA's average all continue.
    assert (first["eval_loss"], first["eval_ema_loss"]) == (again["eval_loss"], again["eval_ema_loss"])
    assert same(weights("a"), weights("b"))
    shutil.copytree(tmp_path / "a" / "checkpoint-6", tmp_path / "resumed" / "checkpoint-6")
    run("resumed", "--resume_from_checkpoint", "last")
    assert same(weights("a"), weights("resumed"))


def test_bad_recipe_flags_are_usage_errors(scripts, tmp_path, parquet_folder):
    for flags in (["--augment_policy", "autoaugment"], ["--randaugment_magnitude", "12"],
                  ["--repeated_augmentations", "0"], ["--ema_decay", "1.5"], ["--random_erasing", "2"],
                  ["--mixup_alpha", "-1"]):
        with pytest.raises(SystemExit) as stop:
            scripts.finetune.main(["--random_init", "true", "--output_dir", str(tmp_path / "x"),
                                   "--dataset_name", str(parquet_folder), *flags])
        assert stop.value.code == 2, flags
    assert not (tmp_path / "x").exists()


def test_show_augmentations_draws_every_view(scripts, parquet_folder, tiny_overrides, tmp_path, repo_root):
    scripts.show_augmentations.main([str(repo_root / "configs" / "cpu_small_finetune_strong.yaml"),
                                     "--config_overrides", tiny_overrides, "--dataset_name", str(parquet_folder),
                                     "--output_dir", str(tmp_path), "--num_images", "4"])
    picture = Image.open(tmp_path / "augmented_batch.png")
    # 8x8 images drawn 4x larger with 2-pixel gaps, after a 150-pixel title column; rows: original, 3 views, mixed
    assert picture.size == (150 + 4 * (32 + 2), 5 * (32 + 2))

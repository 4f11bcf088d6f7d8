"""Probe, kNN, fine-tune, compare, visualize and publish scripts end to end on a tiny dataset."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import yaml

import mae_hf.evaluation
import mae_hf.modeling_mae
from mae_hf import MAEForImageClassification, MAEForPreTraining, MAEModel
from mae_hf.cli import UsageError, run_script
from mae_hf.features import knn_predict
from mae_hf.results import collect_results, finetune_protocol, results_table
from mae_hf.visualize import reconstruction_rows


@pytest.fixture(scope="module")
def evaluated(pretrained_run, scripts, parquet_folder, tmp_path_factory):
    """Probe + kNN of the pretrained and of a random-init encoder, and a short fine-tune."""
    folder, _ = pretrained_run
    root = tmp_path_factory.mktemp("evaluated")
    data = ["--dataset_name", str(parquet_folder)]
    scripts.linear_probe.main(["--model_name_or_path", str(folder), "--output_dir", str(root / "probe"),
                               "--probe_epochs", "3", "--knn_k", "20", "40", *data])
    scripts.linear_probe.main(["--model_name_or_path", str(folder), "--random_init", "true", "--output_dir",
                               str(root / "random" / "probe"), "--probe_epochs", "3", "--knn_k", "20", "40", *data])
    scripts.finetune.main(["--model_name_or_path", str(folder), "--output_dir", str(root / "finetune"),
                           "--num_train_epochs", "1", "--per_device_train_batch_size", "16", "--disable_tqdm", "true",
                           *data])
    return folder, root


def read(path):
    return json.loads(path.read_text())


def test_probe_and_knn_results(evaluated):
    folder, root = evaluated
    probe = read(root / "probe" / "linear_probe_results.json")
    knn = read(root / "probe" / "knn_results.json")
    assert probe["protocol"] == "linear_probe" and probe["encoder"] == "pretrained"
    assert probe["probe_epochs"] == 3 and probe["pooling"] == "cls" and probe["eval_samples"] == 16
    assert 0 <= probe["eval_accuracy"] <= 1
    assert knn["eval_accuracy"] == knn["eval_accuracy_k20"] and "eval_accuracy_k40" in knn
    assert probe["encoder_fingerprint"] == knn["encoder_fingerprint"] != read(
        root / "random" / "probe" / "knn_results.json")["encoder_fingerprint"]
    assert read(root / "random" / "probe" / "linear_probe_results.json")["encoder"] == "random_init"


def test_every_result_file_records_its_run_one_way(evaluated):
    _, root = evaluated
    finetune = read(root / "finetune" / "finetune_results.json")
    for name in ("linear_probe", "knn"):
        probe = read(root / "probe" / f"{name}_results.json")
        assert probe["device"] == "1 x cpu" and "precision" not in probe  # a probe states its bf16, no more
        for key in ("dataset_name", "train_split", "eval_split", "train_samples", "eval_samples",
                    "eval_crop_fraction", "stored_short_side", "seed"):
            assert probe[key] == finetune[key], key


def test_run_record_lists_skipped_images_only_when_asked_or_found():
    from types import SimpleNamespace

    from mae_hf.results import run_record

    class Split(list):
        def __init__(self, name, skipped):
            super().__init__(range(4))
            self.split, self.skipped, self.short_side = name, skipped, 32

    data = SimpleNamespace(dataset_name="d", skip_bad_images=False)
    settings = dict(device=torch.device("cuda", 1), world_size=2, bf16=True, seed=3, crop_fraction=1.0)
    record = run_record(data, Split("train", []), Split("test", []), **settings)
    assert record["device"] == "2 x cuda" and "skipped_images" not in record and "precision" not in record
    record = run_record(data, Split("train", ["row 5"]), Split("test", []), precision="bf16 autocast", **settings)
    assert record["skipped_images"] == {"train": ["row 5"], "test": []} and record["precision"] == "bf16 autocast"
    assert record["train_samples"] == 4 and record["eval_split"] == "test"


def test_probe_keeps_the_pretrained_encoder_and_loads_as_a_classifier(evaluated):
    folder, root = evaluated
    probe = MAEForImageClassification.from_pretrained(root / "probe")
    pretrained = MAEForPreTraining.from_pretrained(folder)
    assert probe.config.linear_probe and probe.config.id2label == {0: "cat", 1: "dog", 2: "ship"}
    for key, value in pretrained.mae.state_dict().items():
        assert torch.equal(probe.mae.state_dict()[key], value), key
    assert not any(p.requires_grad for p in probe.mae.parameters())
    random_probe = MAEForImageClassification.from_pretrained(root / "random" / "probe")
    assert not torch.equal(random_probe.mae.embeddings.cls_token, probe.mae.embeddings.cls_token)


def test_probe_epochs_do_not_rerun_the_encoder(pretrained_run, scripts, parquet_folder, tmp_path, monkeypatch):
    folder, _ = pretrained_run
    calls = []
    original = MAEModel.forward
    monkeypatch.setattr(mae_hf.modeling_mae.MAEModel, "forward",
                        lambda self, *args, **kwargs: calls.append(1) or original(self, *args, **kwargs))
    counts = []
    for epochs in ("1", "6"):
        calls.clear()
        scripts.linear_probe.main(["--model_name_or_path", str(folder), "--output_dir", str(tmp_path / epochs),
                                   "--probe_epochs", epochs, "--knn", "false", "--feature_batch_size", "8",
                                   "--dataset_name", str(parquet_folder)])
        counts.append(len(calls))
    assert counts == [8, 8]  # 48 + 16 images in batches of 8, whatever the number of probe epochs


def test_boolean_flags_parse_as_booleans(pretrained_run, scripts, parquet_folder, tmp_path):
    folder, _ = pretrained_run
    scripts.knn.main(["--model_name_or_path", str(folder), "--random_init", "false", "--output_dir",
                      str(tmp_path / "knn"), "--knn_k", "20", "--dataset_name", str(parquet_folder)],
                     linear_probe=False)
    assert read(tmp_path / "knn" / "knn_results.json")["encoder"] == "pretrained"
    assert not (tmp_path / "knn" / "linear_probe_results.json").exists()


def test_a_folder_with_results_is_refused_unless_overwritten(pretrained_run, scripts, parquet_folder, tmp_path):
    """A second evaluation into the same folder would leave the first one's result files beside its own."""
    folder, _ = pretrained_run
    common = ["--model_name_or_path", str(folder), "--output_dir", str(tmp_path / "probe"), "--knn_k", "20",
              "--dataset_name", str(parquet_folder)]
    scripts.knn.main(common)
    before = (tmp_path / "probe" / "knn_results.json").read_text()
    with pytest.raises(UsageError, match=r"already holds results .*knn_results.json.*--overwrite_output_dir true"):
        scripts.linear_probe.main([*common, "--knn", "false", "--probe_epochs", "1"])
    assert (tmp_path / "probe" / "knn_results.json").read_text() == before
    scripts.linear_probe.main([*common, "--knn", "false", "--probe_epochs", "1", "--overwrite_output_dir", "true"])
    assert sorted(path.name for path in (tmp_path / "probe").glob("*_results.json")) == ["linear_probe_results.json"]
    (tmp_path / "finetune").mkdir()
    (tmp_path / "finetune" / "finetune_results.json").write_text("{}")
    with pytest.raises(UsageError, match="finetune_results.json of another kind of run"):
        scripts.knn.main([*common[:3], str(tmp_path / "finetune"), *common[4:], "--overwrite_output_dir", "true"])


def test_feature_blocks_beyond_the_encoder_fail_before_any_data(pretrained_run, scripts, parquet_folder, tmp_path,
                                                               monkeypatch):
    folder, _ = pretrained_run
    monkeypatch.setattr(mae_hf.evaluation, "load_image_splits", lambda *args, **kwargs: pytest.fail("data read"))
    with pytest.raises(UsageError, match=r"--feature_blocks 4: the encoder has 2 layer\(s\), so it takes 1 to 2"):
        scripts.linear_probe.main(["--model_name_or_path", str(folder), "--output_dir", str(tmp_path / "probe"),
                                   "--feature_blocks", "4", "--dataset_name", str(parquet_folder)])


def test_evaluating_a_pretraining_run_as_a_classifier_fails_before_any_data(pretrained_run, scripts, parquet_folder,
                                                                           tmp_path, monkeypatch):
    folder, _ = pretrained_run
    monkeypatch.setattr("mae_hf.training.load_image_splits", lambda *args, **kwargs: pytest.fail("data read"))
    with pytest.raises(ValueError, match="--do_train false: .* is not a classifier"):
        scripts.finetune.main(["--model_name_or_path", str(folder), "--do_train", "false", "--output_dir",
                               str(tmp_path / "eval"), "--dataset_name", str(parquet_folder)])


def test_knn_k_larger_than_the_training_set_fails_early(pretrained_run, scripts, parquet_folder, tmp_path):
    folder, _ = pretrained_run
    with pytest.raises(ValueError, match="--knn_k 200 needs at least that many training images; .* has 48"):
        scripts.knn.main(["--model_name_or_path", str(folder), "--output_dir", str(tmp_path / "knn"),
                          "--dataset_name", str(parquet_folder)], linear_probe=False)
    assert not (tmp_path / "knn").exists()


def test_probe_refuses_to_overwrite_its_model(pretrained_run, scripts, parquet_folder):
    folder, _ = pretrained_run
    with pytest.raises(UsageError, match="overwrite that model"):
        scripts.linear_probe.main(["--model_name_or_path", str(folder), "--output_dir", str(folder),
                                   "--dataset_name", str(parquet_folder)])


def test_weighted_knn_votes():
    bank = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9], [0.2, 0.8]])
    labels = torch.tensor([0, 0, 1, 1, 1])
    queries = torch.tensor([[1.0, 0.05], [0.05, 1.0]])
    assert knn_predict(bank, labels, queries, ks=(1,))[1].tolist() == [0, 1]
    # k = 5: three neighbours say 1, but the two of class 0 are much closer to the first query.
    assert knn_predict(bank, labels, queries, ks=(5,), temperature=0.05)[5].tolist() == [0, 1]
    assert knn_predict(bank, labels, queries, ks=(5,), temperature=1000.0)[5].tolist() == [1, 1]  # plain majority
    assert knn_predict(bank, labels, queries, ks=(200,))[200].shape == (2,)  # k capped at the bank size


def test_finetune_results_and_layer_decay(evaluated, scripts):
    folder, root = evaluated
    result = read(root / "finetune" / "finetune_results.json")
    assert result["protocol"] == "finetune" and result["layer_decay"] == 0.75 and 0 <= result["eval_accuracy"] <= 1
    assert (result["weight_decay"], result["global_batch_size"]) == (0.05, 16) and result["device"].startswith("1 x ")
    # the fingerprint is of the encoder it started from: the pretrained one the probe also measured
    assert result["encoder_fingerprint"] == read(root / "probe" / "linear_probe_results.json")["encoder_fingerprint"]
    model = MAEForImageClassification.from_pretrained(root / "finetune")
    assert model.config.pooling == "mean" and not model.config.linear_probe
    pretrained = MAEForPreTraining.from_pretrained(folder)
    assert not torch.equal(model.mae.layers[0].mlp.fc1.weight, pretrained.mae.layers[0].mlp.fc1.weight)


def test_layer_decay_groups(tiny_config, tmp_path):
    from mae_hf.data import BatchTransform
    from mae_hf.training import ImageTrainer
    from mae_hf.training_args import ImageTrainingArguments

    model = MAEForImageClassification(tiny_config(num_labels=3))
    args = ImageTrainingArguments(output_dir=str(tmp_path), learning_rate=1.0, weight_decay=0.1, eval_strategy="no")
    transform = BatchTransform.for_model(model.config)
    trainer = ImageTrainer(model=model, args=args, train_transform=transform, eval_transform=transform,
                           layer_decay=0.5)
    optimizer = trainer.create_optimizer()
    learning_rates = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    decays = {id(p): group["weight_decay"] for group in optimizer.param_groups for p in group["params"]}
    assert learning_rates[id(model.classifier.weight)] == 1.0
    assert learning_rates[id(model.mae.layers[1].mlp.fc1.weight)] == 0.5
    assert learning_rates[id(model.mae.layers[0].mlp.fc1.weight)] == 0.25
    assert learning_rates[id(model.mae.embeddings.cls_token)] == 0.125
    assert decays[id(model.mae.layers[0].mlp.fc1.weight)] == 0.1
    assert decays[id(model.mae.layers[0].mlp.fc1.bias)] == decays[id(model.mae.embeddings.cls_token)] == 0.0
    args.decay_all_parameters = True  # plain AdamW, as the reference recipe
    trainer.optimizer = None
    groups = trainer.create_optimizer().param_groups
    assert {group["weight_decay"] for group in groups} == {0.1}


def test_compare_table(evaluated, scripts, capsys):
    _, root = evaluated
    scripts.compare.main([str(root), "--output", str(root / "table.md")])
    table = (root / "table.md").read_text()
    assert table == capsys.readouterr().out
    probe = read(root / "probe" / "linear_probe_results.json")["eval_accuracy"]
    random_probe = read(root / "random" / "probe" / "linear_probe_results.json")["eval_accuracy"]
    row = next(line for line in table.splitlines() if line.startswith("| Linear probe"))
    assert f"| {100 * random_probe:.2f} | {100 * probe:.2f} | {100 * (probe - random_probe):+.2f} |" in row
    with pytest.raises(ValueError):
        scripts.compare.main([str(root / "does-not-exist")])


def test_visualize_script(pretrained_run, scripts, parquet_folder, tmp_path):
    folder, _ = pretrained_run
    scripts.visualize.main([str(folder), "--dataset_name", str(parquet_folder), "--output", str(tmp_path / "r.png"),
                            "--num_images", "3"])
    from PIL import Image

    width, height = Image.open(tmp_path / "r.png").size
    assert height == 4 * (8 * 4 + 2) and width == 150 + 3 * (8 * 4 + 2)


def test_visualize_creates_the_output_folder_and_takes_disable_tqdm(pretrained_run, scripts, parquet_folder,
                                                                    tmp_path):
    folder, _ = pretrained_run
    output = tmp_path / "viz" / "deeper" / "c.png"
    scripts.visualize.main([str(folder), "--dataset_name", str(parquet_folder), "--output", str(output),
                            "--num_images", "2", "--disable_tqdm", "true"])
    assert output.is_file()
    (tmp_path / "file").write_text("")
    with pytest.raises(UsageError, match="is a file, not a folder"):
        scripts.visualize.main([str(folder), "--output", str(tmp_path / "file" / "c.png")])


@pytest.mark.parametrize("norm_pix_loss", [False, True])
def test_perfect_prediction_reconstructs_the_original(tiny_config, pixel_values, noise, norm_pix_loss):
    class Oracle(MAEForPreTraining):
        """Predicts exactly its training target, so the pictures must show the original image."""

        def forward(self, pixel_values, noise=None, **kwargs):
            outputs = super().forward(pixel_values, noise=noise)
            target = self.patchify(pixel_values)
            if self.config.norm_pix_loss:
                target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
            outputs.logits = target
            return outputs

    model = Oracle(tiny_config(norm_pix_loss=norm_pix_loss))
    rows = reconstruction_rows(model, pixel_values * 0.2, noise)  # small values: nothing clamped
    original, masked, reconstruction, pasted = rows
    torch.testing.assert_close(reconstruction, original, atol=1e-4, rtol=0)
    torch.testing.assert_close(pasted, original, atol=1e-4, rtol=0)
    hidden = model.unpatchify(model(pixel_values, noise=noise).mask[..., None].expand(-1, -1, 12)).bool()
    assert torch.all(masked[hidden] == 0.5) and torch.equal(masked[~hidden], original[~hidden])


def test_both_finetune_recipes_in_one_table(evaluated, tmp_path):
    """The plain and the strong recipe are two rows, also for result files written before "finetune_strong" (they
    said "finetune" for both and a table of both failed as two disagreeing results)."""
    _, root = evaluated
    plain = read(root / "finetune" / "finetune_results.json")
    assert plain["protocol"] == "finetune"
    for name, protocol in (("old", "finetune"), ("new", "finetune_strong")):
        strong = dict(plain, protocol=protocol, eval_accuracy=plain["eval_accuracy"] / 2, augment_policy="randaugment",
                      mixup_alpha=0.8, repeated_augmentations=3, ema_decay=0.9999)
        (tmp_path / name).mkdir()
        (tmp_path / name / "finetune_results.json").write_text(json.dumps(strong))
        table = results_table(collect_results([root / "finetune", tmp_path / name]))
        rows = [line for line in table.splitlines() if line.startswith("| Fine-tune")]
        assert rows[0].startswith("| Fine-tune (whole encoder trained) |") and f"{100 * plain['eval_accuracy']:.2f}" \
            in rows[0]
        assert rows[1].startswith("| Fine-tune, strong recipe") and f"{50 * plain['eval_accuracy']:.2f}" in rows[1]
    assert finetune_protocol({"ema_decay": 0.999}) == "finetune_strong" and finetune_protocol({}) == "finetune"


def test_publish_folder_and_card(evaluated, scripts, tmp_path):
    folder, root = evaluated
    out = tmp_path / "hub"
    scripts.publish.main([str(folder), "--probe", str(root / "probe"), "--finetune", str(root / "finetune"),
                          "--results", str(root / "random"), "--output_dir", str(out), "--hub_model_id", "me/mae",
                          "--dataset_id", "uoft-cs/cifar10"])  # the tiny dataset stands in for a copy of CIFAR-10
    for name in ("model.safetensors", "config.json", "modeling_mae.py", "configuration_mae.py",
                 "preprocessor_config.json", "README.md", "reconstructions.png", "loss_curve.png",
                 "finetuned/model.safetensors", "results/pretraining_summary.json"):
        assert (out / name).is_file(), name
    card = (out / "README.md").read_text()
    assert "{{" not in card and "}}" not in card
    metadata = yaml.safe_load(card.split("---")[1])
    assert metadata["library_name"] == "transformers" and metadata["datasets"] == ["uoft-cs/cifar10"]
    values = {r["task"]["name"]: r["metrics"][0]["value"] for r in metadata["model-index"][0]["results"]}
    probe = read(root / "probe" / "linear_probe_results.json")["eval_accuracy"]
    finetune = read(root / "finetune" / "finetune_results.json")["eval_accuracy"]
    assert values["Linear probe (frozen encoder, BatchNorm + linear head)"] == pytest.approx(100 * probe, abs=0.005)
    assert values["Fine-tune (whole encoder trained)"] == pytest.approx(100 * finetune, abs=0.005)
    assert results_table(collect_results([root])) in card
    assert "| kNN, k = 40 |" in card and "probe_epochs 3" in card
    assert '`finetuned/`: the classifier of the "Fine-tune (whole encoder trained)" row below' in card
    assert "weight decay 0.05 (linear weights only), gradients clipped at norm 1" in card
    import transformers  # the versions the numbers were made with, recorded by the runs and shown

    assert "| Software | python " in card and f"transformers {transformers.__version__} |" in card
    assert read(root / "finetune" / "finetune_results.json")["versions"]["torch"] == torch.__version__
    assert {r["dataset"]["split"] for r in metadata["model-index"][0]["results"]} == {"test"}
    assert 'from_pretrained(repo, trust_remote_code=True)' in card and '"me/mae"' in card
    trained_on = read(folder / "pretraining_summary.json")["dataset_name"]  # a local parquet folder
    assert f"| Data | uoft-cs/cifar10 (local copy at `{trained_on}`): train (48 images) |" in card

    # One checkpoint serves the three classes: pretrained encoder + decoder, and the probe's head.
    published = MAEForPreTraining.from_pretrained(out)
    pretrained = MAEForPreTraining.from_pretrained(folder)
    for key, value in pretrained.state_dict().items():
        assert torch.equal(published.state_dict()[key], value), key
    probe_model = MAEForImageClassification.from_pretrained(root / "probe")
    classifier = MAEForImageClassification.from_pretrained(out)
    assert torch.equal(classifier.classifier.weight, probe_model.classifier.weight)

    with pytest.raises(SystemExit) as exit_:  # a usage error: exit code 2, as the README says
        run_script(scripts.publish.main, [str(folder), "--output_dir", str(out)])
    assert exit_.value.code == 2


def test_publish_refuses_numbers_that_are_not_this_models(evaluated, scripts, tmp_path, capsys):
    folder, root = evaluated
    other = read(root / "probe" / "linear_probe_results.json")
    other["encoder_fingerprint"] = "0" * 16  # a probe of another pretrained model
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "linear_probe_results.json").write_text(json.dumps(other))
    disagreeing = read(root / "random" / "probe" / "linear_probe_results.json")
    disagreeing["eval_accuracy"] += 0.25  # a second random-init probe with another number
    (tmp_path / "disagreeing_results.json").write_text(json.dumps(disagreeing))
    random_finetune = tmp_path / "random_finetune"
    shutil.copytree(root / "finetune", random_finetune)
    result = read(random_finetune / "finetune_results.json")
    (random_finetune / "finetune_results.json").write_text(json.dumps(dict(result, encoder="random_init")))
    base = [str(folder), "--probe", str(root / "probe"), "--output_dir", str(tmp_path / "hub")]
    for extra, message, code in (  # 2: the command line alone is wrong; 1: what it names does not fit
            (["--results", str(tmp_path / "other")], "measured another encoder", 1),
            (["--output_dir", str(folder / "hub")], "overlaps the input", 2),
            (["--output_dir", str(tmp_path / "other" / "linear_probe_results.json")], "is a file; expected a folder",
             2),
            (["--results", str(root / "random"), str(tmp_path / "disagreeing_results.json")],
             "Two linear_probe results of the random_init encoder disagree", 1),
            (["--finetune", str(random_finetune)], "evaluated a random-init encoder", 1)):
        with pytest.raises(SystemExit) as exit_:
            run_script(scripts.publish.main, base + extra)
        status, err = exit_.value.code, capsys.readouterr().err
        if isinstance(status, str):  # sys.exit("error: ...") inside the script: exit status 1
            status, err = 1, status
        assert status == code and message in err, (status, err)
        assert not (tmp_path / "hub").exists() and not (folder / "hub").exists()

    (tmp_path / "copy").mkdir()  # the same kNN run found twice: listed once
    shutil.copy(root / "probe" / "knn_results.json", tmp_path / "copy" / "knn_results.json")
    scripts.publish.main(base + ["--results", str(tmp_path / "copy")])
    assert [p.name for p in (tmp_path / "hub" / "results").glob("*knn*")] == ["01_knn_pretrained.json"]


def test_publish_card_names_the_hub_dataset_the_run_used(evaluated, scripts, tmp_path):
    folder, _ = evaluated
    run = tmp_path / "run"
    shutil.copytree(folder, run, ignore=shutil.ignore_patterns("checkpoint-*"))
    summary = read(run / "pretraining_summary.json")
    (run / "pretraining_summary.json").write_text(json.dumps(dict(summary, dataset_name="user/pets")))
    with pytest.raises(ValueError, match="pretrained on the Hub dataset user/pets; the card must name that one"):
        scripts.publish.main([str(run), "--output_dir", str(tmp_path / "hub"), "--dataset_id", "uoft-cs/cifar10"])
    scripts.publish.main([str(run), "--output_dir", str(tmp_path / "hub")])
    card = (tmp_path / "hub" / "README.md").read_text()
    assert yaml.safe_load(card.split("---")[1])["datasets"] == ["user/pets"]
    assert "| Data | user/pets: train (48 images) |" in card and "local copy" not in card


def test_a_card_never_names_a_dataset_the_model_did_not_see(evaluated, scripts, tmp_path, capsys):
    """Local data is a Hub dataset only when --dataset_id says whose copy it is (or it was prepared from one), never
    by its class names; otherwise it is described by its folder, without Hub dataset metadata. The card states the
    model's image size."""
    from mae_hf.publish import resolve_dataset_id
    from mae_hf.results import folder_name

    folder, root = evaluated
    trained_on = read(folder / "pretraining_summary.json")["dataset_name"]
    assert read(folder / "pretraining_summary.json")["class_names"] == ["cat", "dog", "ship"]  # recorded by the run
    scripts.publish.main([str(folder), "--probe", str(root / "probe"), "--output_dir", str(tmp_path / "hub")])
    assert "names no Hub dataset" in capsys.readouterr().out
    card = (tmp_path / "hub" / "README.md").read_text()
    metadata = yaml.safe_load(card.split("---")[1])
    assert "datasets" not in metadata and "model-index" not in metadata
    assert "CIFAR" not in card and "cifar10" not in card
    assert f"pretrained self-supervised on\nthe local dataset `{folder_name(trained_on)}`" in card
    assert f"| Data | a local dataset at `{trained_on}` (not on the Hub): train (48 images) |" in card
    size = read(folder / "config.json")["image_size"]
    assert f"{size}×{size} crops of the local dataset" in card and "images far from the\ndomain or resolution" in card
    cifar10_classes = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    summary = {"dataset_name": "../data/cifar10", "class_names": cifar10_classes}
    assert resolve_dataset_id(summary, None) is None  # CIFAR-10's classes make no copy of the Hub's CIFAR-10
    assert resolve_dataset_id(summary, "me/photos") == "me/photos"  # the user's word


def test_a_card_for_a_local_jpeg_tree_says_what_the_run_saw(tmp_path, scripts, tiny_overrides):
    """A JPEG image-folder tree with CIFAR-10's class names, trained with --train_dir and evaluated on a separate
    --validation_dir: the card names no Hub dataset (no guess from the class names), describes the folders by their
    own names and image counts, says where they came from when told (--dataset_source), and its evaluation lines and
    Limitations name the separate folder, not a held-out part of the training images."""
    import numpy as np
    from PIL import Image

    classes = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    rng = np.random.default_rng(0)
    for split, per_class in (("train", 3), ("test", 1)):
        for name in classes:
            (tmp_path / "cifar10_jpg" / split / name).mkdir(parents=True)
            for index in range(per_class):
                Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(
                    tmp_path / "cifar10_jpg" / split / name / f"{index}.jpg", quality=90)
    run = tmp_path / "run"
    scripts.pretrain.main(["--train_dir", str(tmp_path / "cifar10_jpg" / "train"), "--validation_dir",
                           str(tmp_path / "cifar10_jpg" / "test"), "--output_dir", str(run), "--config_overrides",
                           tiny_overrides, "--per_device_train_batch_size", "10", "--num_train_epochs", "1",
                           "--knn_k", "5", "--disable_tqdm", "true"])
    summary = read(run / "pretraining_summary.json")
    assert summary["class_names"] == classes and summary["eval_samples"] == 10
    scripts.publish.main([str(run), "--output_dir", str(tmp_path / "hub"), "--dataset_source",
                          "a JPEG copy of CIFAR-10 from a public mirror"])
    card = (tmp_path / "hub" / "README.md").read_text()
    metadata = yaml.safe_load(card.split("---")[1])
    assert "datasets" not in metadata and "model-index" not in metadata and "uoft-cs" not in card
    assert "the local dataset `cifar10_jpg/train` (a JPEG copy of CIFAR-10 from a public mirror)" in card
    assert f"| Data | a local dataset at `{tmp_path / 'cifar10_jpg' / 'train'}` (not on the Hub): train (30 images) |" \
        in card
    separate = "the separate folder `cifar10_jpg/test` (10 images, given as --validation_dir)"
    assert f"| Evaluation data | {separate} |" in card
    assert f"the\n  pretraining run evaluated on {separate}." in card and "held-out" not in card
    assert f'repo = "{tmp_path / "hub"}"' in card and "# hub\n" not in card  # the folder's path, not its base name


def test_numbers_measured_on_other_images_are_refused_in_a_row_and_on_a_card(evaluated, scripts, tmp_path, capsys):
    """A random-init baseline evaluated on other images than the pretrained encoder is not a baseline: compare.py and
    publish.py say so instead of printing a gain; a card refuses results measured on another dataset than the
    pretraining's (a local copy of the same dataset counts as the same)."""
    folder, root = evaluated
    probe = read(root / "probe" / "linear_probe_results.json")
    random_probe = read(root / "random" / "probe" / "linear_probe_results.json")
    for change, message in (({"eval_samples": random_probe["eval_samples"] - 1}, "on the same images"),
                            ({"eval_split": "validation"}, "on the same images"),
                            ({"dataset_name": "user/other_pets"}, "on the same images")):
        (tmp_path / "baseline").mkdir(exist_ok=True)
        (tmp_path / "baseline" / "linear_probe_results.json").write_text(json.dumps(dict(random_probe, **change)))
        with pytest.raises(ValueError, match=message):
            results_table(collect_results([root / "probe", tmp_path / "baseline"]))
        with pytest.raises(SystemExit) as exit_:
            run_script(scripts.compare.main, [str(root / "probe"), str(tmp_path / "baseline")])
        assert message in (exit_.value.code if isinstance(exit_.value.code, str) else capsys.readouterr().err)
    # the same dataset under another name of the same folder (a Hub id and a local copy) is the same data
    copy = dict(random_probe, dataset_name="someone/" + os.path.basename(random_probe["dataset_name"]))
    (tmp_path / "baseline" / "linear_probe_results.json").write_text(json.dumps(copy))
    assert "| Linear probe" in results_table(collect_results([root / "probe", tmp_path / "baseline"]))

    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "linear_probe_results.json").write_text(
        json.dumps(dict(probe, dataset_name="uoft-cs/cifar100")))
    with pytest.raises(ValueError, match="the card describes one dataset"):
        scripts.publish.main([str(folder), "--results", str(tmp_path / "elsewhere"),
                              "--output_dir", str(tmp_path / "hub")])
    assert not (tmp_path / "hub").exists()


def test_a_result_file_that_no_script_wrote_is_named(evaluated, scripts, tmp_path, capsys):
    """Accuracies that are no fraction, unknown protocols or encoders, wrong types: one error naming the file and the
    key, in compare.py and publish.py, never a number in a table or a card."""
    folder, root = evaluated
    probe = read(root / "probe" / "linear_probe_results.json")
    for change, key in (({"eval_accuracy": float("nan")}, "eval_accuracy"), ({"eval_accuracy": 1.5}, "eval_accuracy"),
                        ({"eval_accuracy": 87.5}, "eval_accuracy"), ({"eval_accuracy": True}, "eval_accuracy"),
                        ({"eval_accuracy": "0.5"}, "eval_accuracy"), ({"protocol": "linear"}, "protocol"),
                        ({"encoder": "mine"}, "encoder"), ({"dataset_name": 123}, "dataset_name"),
                        ({"eval_samples": "64"}, "eval_samples")):
        edited = tmp_path / "edited"
        edited.mkdir(exist_ok=True)
        (edited / "linear_probe_results.json").write_text(json.dumps(dict(probe, **change)))
        with pytest.raises(SystemExit) as exit_:
            run_script(scripts.compare.main, [str(edited)])
        err = capsys.readouterr().err
        code = exit_.value.code  # sys.exit("error: ...") is exit status 1 with that line
        message = code if isinstance(code, str) else err
        assert (code == 1 or message.startswith("error: ")) and f"linear_probe_results.json: {key} is " in message
        assert "Traceback" not in err
    missing = {key: value for key, value in probe.items() if key != "eval_accuracy"}
    (edited / "linear_probe_results.json").write_text(json.dumps(missing))
    with pytest.raises(SystemExit) as exit_:
        run_script(scripts.publish.main, [str(folder), "--results", str(edited), "--output_dir", str(tmp_path / "hub")])
    code = exit_.value.code
    assert "eval_accuracy is None" in (code if isinstance(code, str) else capsys.readouterr().err)
    assert not (tmp_path / "hub").exists()


def test_a_table_compares_one_architecture_one_encoder_and_one_dataset(evaluated, tmp_path):
    _, root = evaluated
    probe = read(root / "probe" / "linear_probe_results.json")
    random_probe = read(root / "random" / "probe" / "linear_probe_results.json")
    assert probe["architecture"] == random_probe["architecture"]  # recorded by the scripts
    cases = (
        ({"architecture": dict(random_probe["architecture"], image_size=64)}, "architecture"),
        ({"pooling": "mean" if probe.get("pooling") != "mean" else "cls"}, "pooling"))
    for change, message in cases:  # the random-init baseline changed: no gain between different things
        (tmp_path / "baseline").mkdir(exist_ok=True)
        (tmp_path / "baseline" / "linear_probe_results.json").write_text(json.dumps(dict(random_probe, **change)))
        with pytest.raises(ValueError, match=f"has {message} "):
            results_table(collect_results([root / "probe", tmp_path / "baseline"]))
    (tmp_path / "other").mkdir()  # a probe of another (e.g. fine-tuned) model beside this model's fine-tune
    (tmp_path / "other" / "linear_probe_results.json").write_text(
        json.dumps(dict(probe, encoder_fingerprint="0" * 16, model_name_or_path="runs/other")))
    with pytest.raises(ValueError, match="measured two different encoders"):
        results_table(collect_results([tmp_path / "other", root / "finetune"]))
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "knn_results.json").write_text(json.dumps(dict(
        read(root / "probe" / "knn_results.json"), dataset_name="user/other_pets")))
    with pytest.raises(ValueError, match="a table holds the results of one dataset"):
        results_table(collect_results([root / "probe" / "linear_probe_results.json", tmp_path / "elsewhere"]))
    assert "| Fine-tune" in results_table(collect_results([root]))  # the fixture's own runs: one table


def test_a_card_without_a_probe_offers_no_untrained_classifier(evaluated, scripts, tmp_path):
    folder, root = evaluated
    scripts.publish.main([str(folder), "--results", str(root / "random"), "--output_dir", str(tmp_path / "hub"),
                          "--dataset_id", "uoft-cs/cifar10"])
    card = (tmp_path / "hub" / "README.md").read_text()
    assert yaml.safe_load(card.split("---")[1])["pipeline_tag"] == "image-feature-extraction"
    assert 'pipeline("image-classification"' not in card and "AutoModelForImageClassification.from_pretrained" \
        not in card
    assert "There is no trained classification head at the top level" in card
    assert "is a linear probe" not in card
    with pytest.raises(SystemExit) as exit_:
        scripts.publish.main([str(folder), "--output_dir", str(tmp_path / "hub2"), "--dataset_id", "not an id!"])
    assert exit_.value.code == 2 and not (tmp_path / "hub2").exists()


def test_publish_without_network_fails_before_anything(evaluated, scripts, tmp_path, monkeypatch):
    folder, root = evaluated
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError, match="cannot push to the Hub: HF_HUB_OFFLINE is set"):
        scripts.publish.main([str(folder), "--probe", str(root / "probe"), "--output_dir", str(tmp_path / "hub"),
                              "--push_to_hub", "true", "--hub_model_id", "me/mae"])
    assert not (tmp_path / "hub").exists()  # nothing assembled, nothing half-written


def test_published_folder_loads_in_a_clean_process(evaluated, scripts, tmp_path, repo_root):
    folder, root = evaluated
    out = tmp_path / "hub"
    scripts.publish.main([str(folder), "--probe", str(root / "probe"), "--output_dir", str(out)])
    child = f"""
import sys
class Block:  # mae_hf must not be importable: the code comes from the folder
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "mae_hf":
            raise ImportError("blocked")
sys.meta_path.insert(0, Block())
import numpy as np
from PIL import Image
from transformers import AutoModel, AutoModelForImageClassification, AutoModelForPreTraining, pipeline
folder = {str(out)!r}
for auto in (AutoModel, AutoModelForPreTraining, AutoModelForImageClassification):
    print(type(auto.from_pretrained(folder, trust_remote_code=True)).__module__.split(".")[0])
image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 20, 3), dtype=np.uint8))
labels = [p["label"] for p in pipeline("image-classification", model=folder, trust_remote_code=True)(image)]
print(sorted(labels))
"""
    environment = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"))
    result = subprocess.run([sys.executable, "-c", child], cwd=tmp_path, env=environment, capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split("\n")[:4] == ["transformers_modules"] * 3 + ["['cat', 'dog', 'ship']"]

"""Multi-block linear probe and attentive probe (mae_hf/probes.py): features and tokens from one encoder pass."""

import json
import math
from types import SimpleNamespace

import pytest
import torch

import mae_hf.evaluation
import mae_hf.modeling_mae
from mae_hf import MAEForPreTraining, MAEModel
from mae_hf.cli import UsageError
from mae_hf.data import BatchTransform
from mae_hf.probes import (
    AttentiveProbe,
    TokenCache,
    encode_frozen,
    load_head,
    predict_features,
    predict_tokens,
    train_attentive_probe,
    train_multiblock_probe,
)
from mae_hf.results import TITLES, collect_results, results_table

PROBE_ARGS = dict(seed=0, probe_epochs=30, probe_batch_size=32, probe_learning_rate=0.1, probe_weight_decay=0.0,
                  attentive_heads=2, attentive_epochs=15, attentive_batch_size=32, attentive_learning_rate=3e-3,
                  attentive_weight_decay=0.05, disable_tqdm=True)


@pytest.fixture(autouse=True)
def one_thread():
    """These tensors are tiny: a second thread only adds synchronisation (and waits long on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    """A saved tiny MAE (untrained: the probes' mechanics do not need a good encoder)."""
    from conftest import make_tiny_config

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("probe_model") / "mae"
    MAEForPreTraining(make_tiny_config()).save_pretrained(folder)
    return folder


def test_multiblock_features_and_patch_tokens(tiny_config):
    encoder = MAEModel(tiny_config(num_hidden_layers=3)).eval()
    images = torch.randint(0, 256, (5, 3, 8, 8), dtype=torch.uint8)
    transform = BatchTransform.for_model(encoder.config)
    cache = TokenCache((5, 16, 16), torch.device("cpu"))
    pooled, blocks = encode_frozen(encoder, images, transform, batch_size=2, feature_blocks=3, token_cache=cache)
    assert pooled.shape == (5, 16) and blocks.shape == (5, 2 * 3 * 16) and blocks.dtype == torch.float32
    with torch.no_grad():
        output = encoder(transform(images), output_hidden_states=True)
    last = output.last_hidden_state  # the last block after the final LayerNorm: the last two slots
    torch.testing.assert_close(blocks[:, -32:-16], last[:, 0])
    torch.testing.assert_close(blocks[:, -16:], last[:, 1:].mean(dim=1))
    torch.testing.assert_close(blocks[:, :16], encoder.norm(output.hidden_states[1])[:, 0])  # first of the 3 blocks
    torch.testing.assert_close(pooled, output.pooler_output)
    assert cache.tensor.dtype == torch.float16
    torch.testing.assert_close(cache.read(torch.arange(5), torch.device("cpu")).float(), last[:, 1:],
                               atol=2e-3, rtol=2e-3)
    assert encode_frozen(encoder, images, transform)[1] is None  # one block: no multi-block features


def separable(num_images: int, seed: int, patches: int = 16, width: int = 16):
    """Noise tokens that the class (of 3) shifts along a class direction: trivially separable."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(num_images) % 3
    tokens = torch.randn(num_images, patches, width, generator=generator) + 1.5 * torch.eye(width)[labels][:, None]
    return tokens, labels


def test_probes_learn_a_separable_problem(tmp_path):
    args = SimpleNamespace(**PROBE_ARGS)
    train_tokens, train_labels = separable(192, seed=1)
    eval_tokens, eval_labels = separable(60, seed=2)
    device = torch.device("cpu")
    caches = []
    for tokens, storage in ((train_tokens, "memory"), (eval_tokens, "disk")):
        cache = TokenCache(tokens.shape, device, None if storage == "memory" else str(tmp_path / "eval.f16"))
        cache.write(0, tokens)
        caches.append(cache)
    probe = train_attentive_probe(caches[0], train_labels, 3, 16, args, device, bf16=False)
    assert (predict_tokens(probe, caches[1], device, bf16=False) == eval_labels).float().mean() >= 0.95
    caches[1].close()
    assert not (tmp_path / "eval.f16").exists()

    head = train_multiblock_probe(train_tokens.mean(dim=1), train_labels, 3, args)
    assert (predict_features(head, eval_tokens.mean(dim=1)) == eval_labels).float().mean() >= 0.95


def test_attentive_probe_rejects_heads_that_do_not_divide_the_width():
    with pytest.raises(ValueError, match="must divide the encoder's hidden size 16"):
        AttentiveProbe(16, 3, num_heads=3)


def run_probes(scripts, folder, parquet_folder, output_dir, *extra):
    scripts.linear_probe.main(["--model_name_or_path", str(folder), "--output_dir", str(output_dir),
                               "--dataset_name", str(parquet_folder), "--feature_batch_size", "8", "--knn_k", "5",
                               "--probe_epochs", "3", "--attentive_epochs", "2", "--attentive_batch_size", "16",
                               "--attentive_heads", "2", *extra])
    return {path.name.removesuffix("_results.json"): json.loads(path.read_text())
            for path in output_dir.glob("*_results.json")}


def test_one_encoder_pass_feeds_every_probe(model_folder, scripts, parquet_folder, tmp_path, monkeypatch):
    calls, loaded = [], []
    forward, load = MAEModel.forward, mae_hf.evaluation.load_classifier

    def counting_forward(self, *args, **kwargs):
        calls.append(len(args[0] if args else kwargs["pixel_values"]))
        return forward(self, *args, **kwargs)

    def remembering_load(*args, **kwargs):
        model = load(*args, **kwargs)
        loaded.append((model, {k: v.clone() for k, v in model.mae.state_dict().items()}))
        return model

    monkeypatch.setattr(mae_hf.modeling_mae.MAEModel, "forward", counting_forward)
    monkeypatch.setattr(mae_hf.evaluation, "load_classifier", remembering_load)
    results = run_probes(scripts, model_folder, parquet_folder, tmp_path / "memory", "--feature_blocks", "2",
                         "--attentive_probe", "true", "--token_cache", "memory")
    assert sum(calls) == 48 + 16 and len(calls) == 6 + 2  # each image once, in batches of 8, for all protocols
    (model, before), = loaded
    for key, value in model.mae.state_dict().items():
        assert torch.equal(value, before[key]), key  # bit-identical after probing

    assert sorted(results) == ["attentive_probe", "knn", "linear_probe_multiblock"]
    for protocol, result in results.items():
        assert result["protocol"] == protocol and 0 <= result["eval_accuracy"] <= 1
    multiblock, attentive = results["linear_probe_multiblock"], results["attentive_probe"]
    assert multiblock["feature_blocks"] == 2 and multiblock["feature_size"] == 2 * 2 * 16
    assert (attentive["token_cache"], attentive["attentive_heads"], attentive["attentive_epochs"]) == ("memory", 2, 2)
    assert not (tmp_path / "memory" / "linear_probe_results.json").exists()  # k > 1 replaces the plain probe

    # the saved heads reload and take the features they were trained on
    head, info = load_head(str(tmp_path / "memory"), "attentive_probe")
    assert info["init"] == {"hidden_size": 16, "num_labels": 3, "num_heads": 2} and info["id2label"]["0"] == "cat"
    assert head(torch.randn(4, 16, 16)).shape == (4, 3)
    head, info = load_head(str(tmp_path / "memory"), "linear_probe_multiblock")
    assert info["feature_blocks"] == 2 and head(torch.randn(4, 64)).shape == (4, 3)

    table = results_table(collect_results([tmp_path / "memory"]))
    assert TITLES["attentive_probe"] in table and TITLES["linear_probe_multiblock"] in table


def test_memmap_token_cache_gives_the_same_probe(model_folder, scripts, parquet_folder, tmp_path):
    common = ("--attentive_probe", "true", "--linear_probe", "false", "--knn", "false")
    memory, disk = (run_probes(scripts, model_folder, parquet_folder, tmp_path / name, *common, "--token_cache", name)
                    for name in ("memory", "disk"))
    assert list(memory) == list(disk) == ["attentive_probe"]
    memory, disk = memory["attentive_probe"], disk["attentive_probe"]
    assert (memory["token_cache"], disk["token_cache"]) == ("memory", "disk")
    assert disk["eval_accuracy"] == memory["eval_accuracy"]
    assert not list((tmp_path / "disk").glob("*.f16"))  # the memmap files are deleted afterwards
    heads = [load_head(str(tmp_path / name), "attentive_probe")[0].state_dict() for name in ("memory", "disk")]
    for key, value in heads[0].items():
        assert torch.equal(value, heads[1][key]), key


@pytest.mark.parametrize("flags, message", [
    (["--feature_blocks", "3"], "--feature_blocks 3: the encoder has 2 layer\\(s\\), so it takes 1 to 2"),
    (["--attentive_probe", "true", "--attentive_heads", "3"], "--attentive_heads 3 must divide"),
    (["--attentive_probe", "true", "--token_cache", "ssd"], "--token_cache must be 'auto', 'memory' or 'disk'"),
    (["--linear_probe", "false", "--knn", "false"], "Nothing to do"),
])
def test_bad_probe_flags_fail_before_work(model_folder, scripts, parquet_folder, tmp_path, flags, message):
    with pytest.raises((SystemExit, ValueError, UsageError), match=message):
        scripts.linear_probe.main(["--model_name_or_path", str(model_folder), "--output_dir", str(tmp_path / "out"),
                                   "--dataset_name", str(parquet_folder), *flags])
    assert not (tmp_path / "out").exists()


def test_auto_token_cache_goes_to_disk_when_large(tiny_config, tmp_path, monkeypatch):
    import mae_hf.probes

    def cache():
        return mae_hf.probes.token_cache_for(10, tiny_config(), torch.device("cpu"), "auto", str(tmp_path), "x")

    assert cache().storage == "memory"
    monkeypatch.setattr(mae_hf.probes, "MEMORY_CACHE_LIMIT", math.prod((10, 16, 16)) * 2 - 1)  # one byte short
    large = cache()
    assert large.storage == "disk" and (tmp_path / "attentive_probe_tokens_x.f16").is_file()
    large.close()

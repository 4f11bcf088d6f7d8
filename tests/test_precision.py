"""bf16 or fp32 (mae_hf/precision.py): one rule for every script and the demo, on CPUs with and without native bf16
(simulated by replacing the CPU's capabilities), its plan lines, warnings and errors; and the CPU bf16 attention."""

import json

import pytest
import torch

import mae_hf.precision
from mae_hf import MAEForPreTraining
from mae_hf.modeling_mae import CPU_BF16_FORMULA_MAX_TOKENS, eager_attention_forward
from mae_hf.precision import decide_bf16, native_bf16
from mae_hf.training import ThroughputCallback
from mae_hf.training_args import FinetuneArguments, PretrainingArguments
from mae_hf.visualize import reconstruct

AMX = {"amx_bf16": True, "amx_tile": True, "avx512_bf16": True}
AVX512_BF16 = {"avx512_bf16": True}
NO_BF16 = {"avx2": True, "avx512_f": True}


@pytest.fixture
def cpu_with(monkeypatch):
    """Pretend the CPU has these capabilities (as `torch.cpu.get_capabilities()` reports them)."""
    def pretend(capabilities: dict):
        monkeypatch.setattr(mae_hf.precision, "cpu_capabilities", lambda: dict(capabilities))
    return pretend


@pytest.mark.parametrize("capabilities, name", [(AMX, "AMX"), (AVX512_BF16, "AVX512-BF16"),
                                                ({"bf16": True, "neon": True}, "Arm BF16"), (NO_BF16, None)])
def test_native_bf16_names_the_cpu_feature(cpu_with, capabilities, name):
    cpu_with(capabilities)
    assert native_bf16("cpu") == name
    assert native_bf16(torch.device("cpu")) == name


def test_the_real_capabilities_come_from_torch():
    capabilities = mae_hf.precision.cpu_capabilities()
    assert isinstance(capabilities.get("avx512_bf16", False), bool)
    assert native_bf16("cpu") == next((name for key, name in mae_hf.precision.CPU_BF16_FEATURES
                                       if capabilities.get(key)), None)


def test_default_follows_native_bf16_and_says_why(cpu_with, capsys):
    cpu_with(AVX512_BF16)
    assert decide_bf16(None, "cpu") == (True, "bf16 autocast (default: this CPU computes bf16 natively, "
                                              "AVX512-BF16)")
    cpu_with(NO_BF16)
    assert decide_bf16(None, "cpu") == (False, "fp32 (default: this CPU has no native bf16, where bf16 runs slower "
                                               "than fp32)")
    assert decide_bf16(False, "cpu") == (False, "fp32 (--bf16 false)")
    cpu_with(AMX)
    assert decide_bf16(True, "cpu") == (True, "bf16 autocast (--bf16 true)")
    assert decide_bf16(False, "cpu") == (False, "fp32 (--bf16 false)")
    assert capsys.readouterr().err == ""  # nothing to warn about


def test_bf16_on_a_cpu_without_native_bf16_runs_after_one_warning_line(cpu_with, capsys):
    cpu_with(NO_BF16)
    bf16, precision = decide_bf16(True, "cpu")
    assert bf16 and "emulated on this CPU, slower than fp32" in precision
    warning = capsys.readouterr().err
    assert warning.count("\n") == 1 and warning.startswith("warning: --bf16 true on a CPU without native bf16")
    assert "slower than fp32" in warning


@pytest.mark.parametrize("arguments", [PretrainingArguments, FinetuneArguments])
def test_training_arguments_take_the_rule(cpu_with, tmp_path, arguments):
    cpu_with(AMX)
    args = arguments(output_dir=str(tmp_path))
    assert args.bf16 and args.precision == "bf16 autocast (default: this CPU computes bf16 natively, AMX)"
    assert not arguments(output_dir=str(tmp_path), bf16=False).bf16
    cpu_with(NO_BF16)
    args = arguments(output_dir=str(tmp_path))
    assert not args.bf16 and args.precision.startswith("fp32 (default: this CPU has no native bf16")
    assert "precision" not in args.to_dict()  # derived, not a flag: not saved as one


def test_fp16_on_a_cpu_is_refused_with_what_to_use_instead(tmp_path, scripts, capsys, parquet_folder):
    with pytest.raises(ValueError, match=r"--fp16 is half-precision training for GPUs .*--bf16 true"):
        PretrainingArguments(output_dir=str(tmp_path), fp16=True)
    for script in (scripts.pretrain, scripts.finetune):  # a usage error before any work, never a traceback
        with pytest.raises(SystemExit) as exit_info:
            script.main(["--output_dir", str(tmp_path / "out"), "--dataset_name", str(parquet_folder),
                         "--fp16", "true"])
        assert exit_info.value.code == 2
        error = capsys.readouterr().err
        assert "--fp16 is half-precision training for GPUs" in error and "Traceback" not in error
    assert not (tmp_path / "out").exists()
    for script in (scripts.pretrain, scripts.finetune):  # the same for half-precision evaluation
        with pytest.raises(SystemExit) as exit_info:
            script.main(["--output_dir", str(tmp_path / "out"), "--dataset_name", str(parquet_folder),
                         "--fp16_full_eval", "true"])
        error = capsys.readouterr().err
        assert exit_info.value.code == 2 and "--fp16_full_eval evaluates in half precision" in error
    assert not (tmp_path / "out").exists()


def test_an_evaluation_only_run_says_and_records_its_precision(cpu_with, pretrained_run, scripts, parquet_folder,
                                                               tmp_path, capsys):
    cpu_with(AMX)
    folder, _ = pretrained_run
    common = ["--model_name_or_path", str(folder), "--dataset_name", str(parquet_folder), "--do_train", "false",
              "--knn_eval", "false", "--disable_tqdm", "true"]
    for extra, precision in (([], "bf16 autocast (default: this CPU computes bf16 natively, AMX)"),
                             (["--bf16", "false", "--bf16_full_eval", "true"],
                              "fp32 (--bf16 false); evaluation with the model cast to bf16")):
        output = tmp_path / f"eval{len(extra)}"
        scripts.pretrain.main([*common, "--output_dir", str(output), *extra])
        assert f"({precision}): eval_loss" in capsys.readouterr().out
        results = json.loads((output / "eval_results.json").read_text())
        assert results["precision"] == precision and results["bf16"] is (not extra)


class _State:
    is_world_process_zero, max_steps = True, 10


@pytest.mark.parametrize("capabilities, expected", [
    (AMX, "bf16 autocast (default: this CPU computes bf16 natively, AMX)"),
    (NO_BF16, "fp32 (default: this CPU has no native bf16, where bf16 runs slower than fp32)")])
def test_plan_line_says_which_precision_and_why(cpu_with, tmp_path, capsys, capabilities, expected):
    cpu_with(capabilities)
    args = PretrainingArguments(output_dir=str(tmp_path), max_steps=10)
    ThroughputCallback(images_per_step=8).on_train_begin(args, _State(), None)
    assert f"[plan] device cpu x1, {expected}, torch_compile=False; 10 steps" in capsys.readouterr().out


def test_pretrain_bf16_true_on_a_cpu_without_native_bf16(cpu_with, scripts, tmp_path, capsys, parquet_folder,
                                                         tiny_overrides):
    cpu_with(NO_BF16)
    scripts.pretrain.main(["--output_dir", str(tmp_path / "run"), "--dataset_name", str(parquet_folder),
                           "--config_overrides", tiny_overrides, "--per_device_train_batch_size", "16",
                           "--num_train_epochs", "1", "--knn_eval", "false", "--disable_tqdm", "true",
                           "--bf16", "true"])
    captured = capsys.readouterr()
    warnings = [line for line in captured.err.splitlines() if "without native bf16" in line]
    assert len(warnings) == 1 and "slower than fp32" in warnings[0]
    assert "bf16 autocast (--bf16 true; emulated on this CPU, slower than fp32)" in captured.out
    assert json.loads((tmp_path / "run" / "pretraining_summary.json").read_text())["bf16"] is True


@pytest.mark.parametrize("capabilities, bf16", [(AVX512_BF16, True), (NO_BF16, False)])
def test_probe_and_knn_features_take_the_rule(cpu_with, pretrained_run, scripts, parquet_folder, tmp_path, capsys,
                                              capabilities, bf16):
    cpu_with(capabilities)
    folder, _ = pretrained_run
    scripts.linear_probe.main(["--model_name_or_path", str(folder), "--output_dir", str(tmp_path / "probe"),
                               "--probe_epochs", "1", "--knn_k", "5", "--dataset_name", str(parquet_folder)])
    for protocol in ("linear_probe", "knn"):
        assert json.loads((tmp_path / "probe" / f"{protocol}_results.json").read_text())["bf16"] is bf16
    assert f"[plan] frozen encoder on cpu, {decide_bf16(None, 'cpu')[1]}" in capsys.readouterr().out


def test_reconstructions_in_bf16_match_fp32(tiny_config, pixel_values, noise):
    torch.manual_seed(0)
    model = MAEForPreTraining(tiny_config())
    fp32, fp32_loss = reconstruct(model, pixel_values, noise)
    bf16, bf16_loss = reconstruct(model, pixel_values, noise, bf16=True)
    assert bf16.dtype == torch.float32 and not torch.equal(bf16, fp32)  # computed in bf16, pictures as before
    torch.testing.assert_close(bf16, fp32, atol=0.03, rtol=0)
    assert bf16_loss.item() == pytest.approx(fp32_loss.item(), rel=0.02)


def test_visualize_script_says_its_precision(cpu_with, pretrained_run, scripts, parquet_folder, tmp_path, capsys):
    cpu_with(NO_BF16)
    folder, _ = pretrained_run
    scripts.visualize.main([str(folder), "--dataset_name", str(parquet_folder), "--output", str(tmp_path / "r.png")])
    assert "(fp32 (default: this CPU has no native bf16" in capsys.readouterr().out
    scripts.visualize.main([str(folder), "--dataset_name", str(parquet_folder), "--output", str(tmp_path / "r.png"),
                            "--bf16", "false"])
    assert "(fp32 (--bf16 false))" in capsys.readouterr().out


# ---------------------------------------------------------------- attention on a CPU in bf16


def attention_functions(model, pixel_values, noise, train: bool) -> set:
    """The attention functions the blocks of `model` call for one forward under CPU bf16 autocast."""
    chosen, original = set(), type(model.mae.layers[0].attention).attention_function

    def spy(self, query, output_attentions):
        function = original(self, query, output_attentions)
        chosen.add(function)
        return function

    type(model.mae.layers[0].attention).attention_function = spy
    try:
        with torch.set_grad_enabled(train), torch.autocast("cpu", dtype=torch.bfloat16):
            model(pixel_values, noise=noise)
    finally:
        type(model.mae.layers[0].attention).attention_function = original
    return chosen


def test_cpu_bf16_training_computes_attention_with_the_formula(tiny_config, pixel_values, noise, monkeypatch):
    torch.manual_seed(0)
    model = MAEForPreTraining(tiny_config())
    assert model.config._attn_implementation == "sdpa"
    assert attention_functions(model, pixel_values, noise, train=True) == {eager_attention_forward}
    assert eager_attention_forward not in attention_functions(model, pixel_values, noise, train=False)  # inference
    # Long sequences keep sdpa's kernel (the formula's token x token scores grow with the square of the length).
    monkeypatch.setattr("mae_hf.modeling_mae.CPU_BF16_FORMULA_MAX_TOKENS", 4)
    assert eager_attention_forward not in attention_functions(model, pixel_values, noise, train=True)
    assert CPU_BF16_FORMULA_MAX_TOKENS == 577


def test_cpu_bf16_formula_gives_sdpa_kernels_loss_and_gradients(tiny_config, pixel_values, noise, monkeypatch):
    torch.manual_seed(0)
    model = MAEForPreTraining(tiny_config())

    def loss_and_gradients():
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(pixel_values, noise=noise).loss
        loss.backward()
        return loss.detach(), torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    formula = loss_and_gradients()
    monkeypatch.setattr("mae_hf.modeling_mae.CPU_BF16_FORMULA_MAX_TOKENS", 0)  # sdpa's kernel for every length
    kernel = loss_and_gradients()
    torch.testing.assert_close(formula[0], kernel[0], rtol=1e-2, atol=1e-3)
    assert (formula[1] - kernel[1]).norm() <= 0.02 * kernel[1].norm()


def test_eager_softmax_matches_a_float32_softmax_in_bf16():
    torch.manual_seed(0)
    query, key, value = (torch.randn(2, 3, 17, 8, dtype=torch.bfloat16) for _ in range(3))
    module = torch.nn.Module()
    _, weights = eager_attention_forward(module, query, key, value, None, scaling=8 ** -0.5)
    scores = torch.matmul(query, key.transpose(-2, -1)) * 8 ** -0.5
    assert weights.dtype == torch.bfloat16
    torch.testing.assert_close(weights, scores.softmax(-1, dtype=torch.float32).to(torch.bfloat16), atol=4e-3,
                               rtol=0)


@pytest.fixture
def nvidia_gpu(monkeypatch):
    """Pretend a CUDA GPU of a compute capability is there; returns the calls to torch's TF32 switch."""
    switched = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)  # counts emulated bf16 too
    monkeypatch.setattr(torch, "set_float32_matmul_precision", switched.append)

    def with_capability(capability):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
        return switched
    return with_capability


def test_gpus_before_ampere_default_to_fp32_without_tf32(nvidia_gpu):
    switched = nvidia_gpu((7, 5))  # a T4: torch.cuda.is_bf16_supported() says True, but bf16 is emulated there
    assert native_bf16("cuda") is None
    assert decide_bf16(None, "cuda") == (False, "fp32 (default: this cuda device has no native bf16)")
    assert switched == []


def test_ampere_gets_bf16_by_default_and_tf32_in_fp32(nvidia_gpu):
    switched = nvidia_gpu((8, 0))
    assert native_bf16("cuda") == "CUDA"
    assert decide_bf16(None, "cuda") == (True, "bf16 autocast (default: this cuda device computes bf16 natively, "
                                               "CUDA)")
    assert switched == []  # bf16: nothing to switch
    assert decide_bf16(False, "cuda") == (False, "fp32 (--bf16 false), matrix products in TF32 (Ampere or newer)")
    assert switched == ["high"]
    assert decide_bf16(False, "cuda", tf32=False) == (False, "fp32 (--bf16 false)")  # --tf32 false
    assert switched == ["high"]

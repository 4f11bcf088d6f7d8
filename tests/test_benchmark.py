"""scripts/benchmark.py's model suite as a matrix: both models in several modes in one run, with CPU time, the GEMM
limit and the profile; on a tiny model (the figures themselves are measured by hand, docs/cpu_speed.md)."""

import json
from pathlib import Path

import pytest

from mae_hf.benchmark import main

TINY = "image_size=8,patch_size=2,hidden_size=16,num_hidden_layers=2,num_attention_heads=2,decoder_hidden_size=16," \
       "decoder_num_hidden_layers=1,decoder_num_attention_heads=2"


def test_matrix_of_modes_in_one_run(tmp_path, capsys):
    main(["--device", "cpu", "--config_overrides", TINY, "--batch_size", "4", "--warmup", "0", "--steps", "1",
          "--rounds", "2", "--modes", "fp32", "bf16", "--profile_steps", "1", "--output_json",
          str(tmp_path / "record.json"), "--baseline_dir", str(Path(__file__).resolve().parents[1])])
    record = json.loads((tmp_path / "record.json").read_text())
    assert record["modes"] == ["fp32", "bf16"] and record["optimizer"] == "fused"
    assert record["dtype"] is None and record["compile"] is None  # each mode names its own, not the run
    assert set(record["results"]) == {f"{model} {mode}" for model in ("mae_hf", "ViTMAE", "baseline")
                                      for mode in ("fp32", "bf16")}
    assert record["results"]["baseline fp32"]["over_baseline_first_mode"] == 1.0
    from transformers import AutoConfig

    from mae_hf import MAEConfig
    assert AutoConfig.for_model("mae_hf").__class__ is MAEConfig  # the baseline registered nothing
    for result in record["results"].values():
        assert len(result["images_per_s_rounds"]) == len(result["cpu_ms_per_image_rounds"]) == 2
        assert result["images_per_s"] > 0 and result["cpu_ms_per_image"] > 0 and result["percent_of_gemm_limit"] > 0
        assert result["train_gflop_per_image"] > 0
    assert record["results"]["ViTMAE bf16"]["over_vit_mae"] == 1.0
    assert record["results"]["mae_hf fp32"]["over_mae_hf_first_mode"] == 1.0
    assert len(record["load_average_before"]) == 3
    assert record["gemm_limit_images_per_s"]["bf16"] > 0 and record["gemm_limit_images_per_s"]["fp32"] > 0
    printed = capsys.readouterr().out
    assert "GEMM limit" in printed and "| mae_hf | bf16 |" in printed and "profile, bf16" in printed
    assert "mae_hf / ViTMAE, fp32:" in printed and "load average" in printed


def test_unknown_mode_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--device", "cpu", "--modes", "fp32", "fp8"])
    assert exit_info.value.code == 2 and "--modes: unknown mode(s) ['fp8']" in capsys.readouterr().err


def test_baseline_dir_without_a_package_is_refused(tmp_path):
    with pytest.raises(ValueError, match="--baseline_dir .*: no mae_hf/modeling_mae.py there"):
        main(["--device", "cpu", "--config_overrides", TINY, "--batch_size", "2", "--baseline_dir", str(tmp_path)])


def test_attention_suite_times_sdpa_against_the_formula(tmp_path):
    main(["--device", "cpu", "--suite", "attention", "--config_overrides", TINY, "--batch_size", "2", "--steps", "1",
          "--rounds", "2", "--attention_tokens", "5", "9", "--output_json", str(tmp_path / "record.json")])
    rows = json.loads((tmp_path / "record.json").read_text())["rows"]
    assert [(row["tokens"], row["dtype"], row["pass"]) for row in rows] == [
        (tokens, dtype, step) for tokens in (5, 9) for dtype in ("float32", "bfloat16")
        for step in ("forward + backward", "inference")]
    assert all(len(row["seconds"]["sdpa"]) == 2 and row["sdpa_over_formula"] > 0 for row in rows)


def test_modes_on_a_cpu_without_native_bf16_warn_for_the_bf16_modes_only(tmp_path, capsys, monkeypatch):
    import mae_hf.precision

    monkeypatch.setattr(mae_hf.precision, "cpu_capabilities", lambda: {"avx2": True})
    common = ["--device", "cpu", "--config_overrides", TINY, "--batch_size", "2", "--warmup", "0", "--steps", "1",
              "--rounds", "1", "--no-gemm", "--output_json", str(tmp_path / "record.json")]
    main([*common, "--bf16", "--modes", "fp32"])
    assert "without native bf16" not in capsys.readouterr().err  # --modes decides: fp32 only
    main([*common, "--modes", "fp32", "bf16"])
    warnings = [line for line in capsys.readouterr().err.splitlines() if "without native bf16" in line]
    assert len(warnings) == 1 and warnings[0].startswith("warning: --modes bf16 on a CPU without native bf16")
    main([*common, "--bf16"])  # the flag as this script spells it
    err = capsys.readouterr().err
    assert "warning: --bf16 on a CPU without native bf16" in err and "--bf16 true" not in err
    assert json.loads((tmp_path / "record.json").read_text())["dtype"] == "bf16 autocast"


def test_pipeline_from_a_prepared_folder_lowers_its_workers_to_fit_shared_memory(tmp_path, monkeypatch, capsys):
    # 8 canvases of 3 x 341 x 384 (3.1 MB a batch): 2 workers x 2 prefetched batches + 1 need 15.7 MB, 1 worker 9.4
    # MB; a third of 30 MB holds the latter. The training loader is the only one the benchmark makes: counting an
    # evaluation loader's batches too, or taking --data_workers as a setting to refuse, would stop the run.
    import mae_hf.data.streaming as streaming

    monkeypatch.setattr(streaming, "shared_memory_free", lambda path="/dev/shm": 30 * 2**20)
    main(["--suite", "pipeline", "--device", "cpu", "--config_overrides", TINY, "--batch_size", "8", "--warmup", "0",
          "--steps", "1", "--rounds", "1", "--pipeline_prepared", "16", "--data_workers", "2", "--data_dir",
          str(tmp_path), "--output_json", str(tmp_path / "record.json")])
    record = json.loads((tmp_path / "record.json").read_text())
    assert record["data_workers_asked"] == 2 and record["data_workers"] == 1
    assert "Using 1 worker(s) x 2 prefetched batch(es) instead." in capsys.readouterr().err
    assert record["sync_debug"] is None  # not asked for


def test_sync_debug_window_counts_the_synchronising_calls_by_line():
    import warnings

    from mae_hf.benchmark import SyncDebugWindow

    window = SyncDebugWindow(first_step=3, steps=2, device="cpu")
    with window.recording():
        for _ in range(2):  # one line, twice
            warnings.warn("called a synchronizing CUDA operation")
        warnings.warn("something else")
    assert window.record()["warnings"] is None  # a CPU run cannot count them: none, not zero
    window.cuda = True  # as a CUDA run records the same warnings
    record = window.record()
    assert record["warnings"] == 2 and record["steps"] == 2
    [(place, count)] = record["places"].items()
    assert place.startswith("tests/test_benchmark.py:") and count == 2


def test_device_timings_wait_for_the_device(monkeypatch):
    """CUDA runs asynchronously: a time read without draining its queue measures the queueing, not the work."""
    import torch

    from mae_hf.benchmark import device_seconds

    happened = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: happened.append("synchronize"))
    device_seconds("cuda", lambda value: happened.append(value), "work")
    assert happened == ["synchronize", "work", "synchronize"]
    happened.clear()
    device_seconds("cpu", lambda value: happened.append(value), "work")
    assert happened == ["work"]

"""`make gpu-check` without a GPU: one line says so, the CPU parts run, JSON + Markdown are written, exit 0."""

from __future__ import annotations

import json

import pytest
import torch

from pipeline.studies.gpu_check import main


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU-only path; on a GPU `make gpu-check` itself runs")
def test_without_a_gpu_it_says_so_and_runs_the_cpu_parts(tmp_path, capsys):
    assert main([str(tmp_path), "--skip-tests", "--seconds", "0.2"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith("no CUDA device here: the GPU parts are skipped")
    record = json.loads((tmp_path / "gpu-check.json").read_text())
    assert record["cuda"] is False and record["peak_tflops"] > 0
    (lab,), (train,) = record["labeling"], record["training"]
    assert lab["preset"] == train["preset"] == "tiny" and lab["audio_s_per_s"] > train["audio_s_per_s"] > 0
    assert 0 < lab["share_of_peak"] < 1.5 and lab["batch"] >= 1  # FLOPs by the model's own count over the peak
    md = (tmp_path / "gpu-check.md").read_text()
    assert "| labeling | tiny |" in md and "GPU figures are still to be measured" in md
    assert lab["projection"]["hours_per_device_day"] == pytest.approx(24 * lab["audio_s_per_s"])
    assert f"| tiny | {24 * lab['audio_s_per_s']:,.0f} |" in md


def test_the_projection_turns_a_labeling_rate_into_hours_per_day_and_devices_for_a_million_hours():
    from pipeline.studies.gpu_check import flops_per_audio_s, projection

    # 8,000× real time: 192,000 h a day, so 1 M h in 24 h takes ⌈5.2⌉ = 6 devices
    assert projection(8000.0) == {"hours_per_device_day": 192_000.0, "devices_for_corpus": 6}
    assert projection(10_000.0) == {"hours_per_device_day": 240_000.0, "devices_for_corpus": 5}
    # large = base with d and FFN doubled: its matmuls (most of the FLOPs) cost about 4× base's
    tiny, base, large = (flops_per_audio_s(p) for p in ("tiny", "base", "large"))
    assert tiny < base < large and 3.0 < large / base < 4.0

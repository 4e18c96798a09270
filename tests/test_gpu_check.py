"""`make gpu-check` without a GPU: one line says so, the CPU parts run, JSON + Markdown are written, exit 0."""

from __future__ import annotations

import json

import pytest
import torch

from pipeline.report.gpu_check import main


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

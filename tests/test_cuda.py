"""Calibration, GPTQ, evaluation and a whole search on a CUDA GPU agree with the CPU (skipped without one)."""

from __future__ import annotations

import copy

import pytest
import torch

from llmtailor import compression, text
from llmtailor.compression import calibration, sequential
from llmtailor.compression.quantize import gptq
from llmtailor.evaluators import quality
from llmtailor.plan import CompressionPlan, LayerPrecision

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _windows(tiny, count=4, tokens=64):
    return calibration.calibration_windows(tiny.tokenizer, text.split("pydoc").calibration, count, tokens, seed=0)


def test_statistics_gptq_and_quality_on_cuda_match_the_cpu(tiny):
    windows = _windows(tiny)
    on_cpu = calibration.collect(tiny.model, tiny.arch, windows, "cpu")
    on_gpu = calibration.collect(tiny.model, tiny.arch, windows, "cuda")
    assert next(tiny.model.parameters()).device.type == "cpu"  # the teacher is put back where it was
    for name, h in on_cpu.hessians.items():
        torch.testing.assert_close(on_gpu.hessians[name], h, rtol=1e-3, atol=1e-4)

    layer = tiny.arch.linears[0].name
    weight, hessian = tiny.model.get_submodule(layer).weight.data, on_cpu.hessian(layer)
    precision = LayerPrecision(4, 32, method="gptq", act_order=True)
    cpu_q, gpu_q = gptq(weight, precision, hessian), gptq(weight.cuda(), precision, hessian.cuda())
    agree = (cpu_q.codes == gpu_q.codes.cpu()).float().mean().item()
    assert agree > 0.99  # float rounding can flip a code that sits on a boundary
    cpu_error = calibration.output_error(weight, cpu_q.dequantize(), hessian)
    gpu_error = calibration.output_error(weight, gpu_q.dequantize().cpu(), hessian)
    assert gpu_error == pytest.approx(cpu_error, rel=0.02)

    plan = CompressionPlan(precision={x.name: precision for x in tiny.arch.linears})
    reference_cpu = quality.Reference(tiny.model, tiny.tokenizer, text.split("pydoc").evaluation, 2, 64)
    cpu = quality.measure(compression.apply(plan, tiny.model, tiny.arch, on_cpu), reference_cpu)
    gpu_teacher = copy.deepcopy(tiny.model).cuda()
    reference_gpu = quality.Reference(gpu_teacher, tiny.tokenizer, text.split("pydoc").evaluation, 2, 64)
    assert reference_gpu.teacher_logprobs[0].device.type == "cuda"
    gpu = quality.measure(compression.apply(plan, gpu_teacher, tiny.arch, on_gpu), reference_gpu)
    assert gpu.kl == pytest.approx(cpu.kl, rel=0.05, abs=1e-5)
    assert gpu.perplexity == pytest.approx(cpu.perplexity, rel=0.01)


def test_sequential_mode_and_sampled_windows_run_on_cuda(tiny):
    plan = CompressionPlan(precision={x.name: LayerPrecision(4, 32, method="gptq") for x in tiny.arch.linears})
    model = sequential.compress_sequential(plan, tiny.model, tiny.arch, _windows(tiny), device="cuda")
    assert next(model.parameters()).device.type == "cpu"
    sampled = calibration.generated_windows(tiny.model, tiny.tokenizer, 3, 16, device="cuda", top_p=0.9)
    assert sampled.shape == (3, 16) and sampled.device.type == "cpu"


def test_a_guided_search_runs_on_cuda(tiny_model_dir, tmp_path, capsys):
    from llmtailor import cli

    argv = ["fit", str(tiny_model_dir), "--memory", "500kB", "--trials", "3", "--results", str(tmp_path), "--space",
            "guided", "--calibration-windows", "4", "--torch-device", "cuda", "--tasks", "none", "--context", "256",
            "--prompt", "64", "--eval-windows", "2", "--window-tokens", "64", "--no-progress"]
    assert cli.main(argv) == 0, capsys.readouterr().err
    assert "Best plan that fits" in capsys.readouterr().out

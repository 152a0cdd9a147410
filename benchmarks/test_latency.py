"""SDK latency on the shipped default plan for k x steps, and the baselines at k=8, 20 steps.

    pytest benchmarks/test_latency.py --benchmark-only --benchmark-json=benchmarks/results/cpu.json

Baselines run in the same session on the same weights, k, steps and seed; compare them as
ratios (benchmark group "k8-steps20"). The suite is not part of the CI test run.
"""
import numpy as np
import pytest


@pytest.mark.parametrize("steps", [10, 20, 50])
@pytest.mark.parametrize("k", [1, 4, 8, 16])
def test_sdk(benchmark, segmenter, image01, k, steps):
    benchmark.group = f"sdk-steps{steps}"
    benchmark.extra_info.update(k=k, steps=steps)
    r = benchmark.pedantic(segmenter.run, args=(image01,), kwargs=dict(k=k, steps=steps, seed=0),
                           rounds=5, warmup_rounds=1)
    assert r.masks.shape[0] == k


@pytest.fixture(scope="module")
def baselines(segmenter):
    pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    import torch
    from msld_export.sampling.baselines import OrtPerHypothesis, torch_model_for_plan
    torch.set_num_threads(segmenter.backend.threads)
    threads = segmenter.backend.threads
    return (torch_model_for_plan(segmenter.plan), OrtPerHypothesis(segmenter.plan, threads),
            OrtPerHypothesis(segmenter.plan, threads, sdk_settings=True))


K, STEPS = 8, 20


def test_k8_sdk(benchmark, segmenter, image01):
    benchmark.group = "k8-steps20"
    benchmark.pedantic(segmenter.run, args=(image01,), kwargs=dict(k=K, steps=STEPS, seed=0), rounds=5,
                       warmup_rounds=1)


def test_k8_torch_eager_per_hypothesis(benchmark, segmenter, image01, baselines):
    from msld_export.sampling.baselines import torch_eager_per_hypothesis
    benchmark.group = "k8-steps20"
    model = baselines[0]
    probs = benchmark.pedantic(torch_eager_per_hypothesis, args=(model, segmenter.plan, image01[:, :, 0], K, STEPS, 0),
                               rounds=3, warmup_rounds=1)
    np.testing.assert_allclose(probs, segmenter.run(image01, k=K, steps=STEPS, seed=0).probs, atol=1e-3)


@pytest.mark.parametrize("settings", ["ort_default", "sdk"])
def test_k8_ort_per_hypothesis(benchmark, segmenter, image01, baselines, settings):
    benchmark.group = "k8-steps20"
    ort_b = baselines[1] if settings == "ort_default" else baselines[2]
    probs = benchmark.pedantic(ort_b, args=(image01[:, :, 0], K, STEPS, 0), rounds=3, warmup_rounds=1)
    np.testing.assert_allclose(probs, segmenter.run(image01, k=K, steps=STEPS, seed=0).probs, atol=1e-3)

"""Every architecture behind the one ranker interface: shapes, gradients, determinism, FLOPs, configs."""

from __future__ import annotations

import pytest
import torch

from model.batch import Batch
from model.config import Arch, ModelConfig, Size, preset
from model.factory import build_model, count_params, flops_per_sample, random_arrays
from model.learner import OnlineLearner
from model.ranker import combined_score
from model.spec import default_live_spec

torch.set_num_threads(2)
SPEC = default_live_spec()
ARCHS = list(Arch)


def small(arch: Arch, **kw) -> ModelConfig:
    return preset(arch, Size.S, SPEC, emb_buckets=2048, **kw)


@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: a.value)
def test_forward_predict_and_tokens(arch: Arch) -> None:
    model = build_model(SPEC, small(arch), "cpu")
    batch = Batch.from_arrays(random_arrays(SPEC, 16))
    logits, aux = model(batch)
    assert logits.shape == (16, len(SPEC.tasks)) and aux.shape == ()
    probs = model.predict(batch)
    assert torch.all((probs > 0) & (probs < 1))
    assert combined_score(probs, SPEC).shape == (16,)
    tokens = model.token_outputs(batch)
    assert tokens[0].shape == (16, SPEC.n_tokens(), model.config.d_model)
    n_layers = model.config.n_layers if arch not in (Arch.DLRM, Arch.DCNV2) else 0
    assert len(tokens) == 1 + n_layers
    sims = model.token_similarity(batch)
    assert all(-1.0 <= s <= 1.0 for s in sims)


@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: a.value)
def test_gradients_reach_every_parameter(arch: Arch) -> None:
    model = build_model(SPEC, small(arch), "cpu")
    # The deep towers start at zero beside the wide path (a fresh model is its logistic regression), so
    # nothing below them has a gradient until they have taken one step.
    OnlineLearner(model, SPEC).step(random_arrays(SPEC, 32, seed=0))
    batch = Batch.from_arrays(random_arrays(SPEC, 32, seed=1))
    logits, aux = model(batch)
    (torch.nn.functional.binary_cross_entropy_with_logits(logits, batch.labels) + aux).backward()
    dead = [name for name, p in model.named_parameters()
            if p.grad is None or (p.grad.coalesce().values() if p.grad.is_sparse else p.grad).abs().sum() == 0]
    assert not dead, f"no gradient reaches {dead}"


@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: a.value)
def test_seeded_build_is_deterministic(arch: Arch) -> None:
    batch = Batch.from_arrays(random_arrays(SPEC, 8, seed=2))
    a, b, c = (build_model(SPEC, small(arch, seed=s), "cpu") for s in (7, 7, 8))
    assert torch.equal(a.predict(batch), b.predict(batch))
    # (predictions of fresh models are the wide path's, zero-initialised; the deep weights carry the seed)
    assert torch.equal(a.token_outputs(batch)[-1], b.token_outputs(batch)[-1])
    assert not torch.equal(a.token_outputs(batch)[-1], c.token_outputs(batch)[-1])


def test_params_and_flops_grow_with_size_and_are_measured() -> None:
    for arch in (Arch.ZENITH, Arch.DLRM):
        counts = [count_params(build_model(SPEC, preset(arch, s, SPEC, emb_buckets=1024), "cpu")) for s in "SML"]
        assert counts[0].dense < counts[1].dense < counts[2].dense
    model = build_model(SPEC, preset(Arch.ZENITH, "S", SPEC, emb_buckets=1024), "cpu")
    flops = flops_per_sample(model, SPEC)
    # every dense weight is used about once per sample in a forward: FLOPs ~ 2 x dense params (order of magnitude)
    assert 0.5 * count_params(model).dense < flops < 20 * count_params(model).dense


def test_presets_of_one_size_have_comparable_dense_params() -> None:
    for size in "SML":
        dense = {a: count_params(build_model(SPEC, preset(a, size, SPEC, emb_buckets=64), "cpu")).dense
                 for a in (Arch.DLRM, Arch.DCNV2, Arch.RANKMIXER, Arch.ZENITH)}
        assert max(dense.values()) < 2.5 * min(dense.values()), dense


@pytest.mark.parametrize(("cfg", "match"), [
    (ModelConfig(arch=Arch.ZENITH, d_model=64, rsa_k=20), r"choose rsa_k so that T\*k % d_model == 0, e.g. rsa_k="),
    (ModelConfig(arch=Arch.ZENITH, d_model=48, rsa_k=40, n_layers=2), r"choose rsa_k from e.g."),
    (ModelConfig(arch=Arch.RANKMIXER, d_model=64), r"choose d_model divisible by 12, e.g. d_model=60 or 72"),
    (ModelConfig(arch=Arch.TRANSFORMER, d_model=50, n_heads=4), r"choose n_heads from \[1, 2, 5, 10\]"),
    (ModelConfig(arch=Arch.ZENITH_PP, d_model=32, n_experts=4, top_k=5), r"top_k must be in 1..n_experts=4"),
    (ModelConfig(arch=Arch.ZENITH_PP, d_model=32, n_experts=1), r"TSMoE needs n_experts >= 2"),
    (ModelConfig(arch=Arch.DCNV2, cross_layers=0), r"DCNv2 needs cross_layers >= 1"),
    (ModelConfig(arch=Arch.DLRM, mlp_hidden=()), r"mlp_hidden must list positive widths"),
])
def test_malformed_configs_say_what_to_change(cfg: ModelConfig, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        build_model(SPEC, cfg, "cpu")


def test_config_json_round_trip_and_unknown_fields() -> None:
    cfg = preset(Arch.ZENITH_PP, "M", SPEC, emb_bucket_overrides=(("hour", 64),))
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(AssertionError, match="unknown ModelConfig fields"):
        ModelConfig.from_dict({**cfg.to_dict(), "d_modle": 3})
    with pytest.raises(AssertionError, match="names unknown tables"):
        build_model(SPEC, cfg.replace(emb_bucket_overrides=(("nope", 4),)), "cpu")


@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: a.value)
def test_bf16_autocast_path_runs(arch: Arch) -> None:
    """The CUDA bf16 path uses autocast; CPU autocast exercises the same dtype handling here."""
    model = build_model(SPEC, small(arch), "cpu")
    batch = Batch.from_arrays(random_arrays(SPEC, 8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, aux = model(batch)
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    (logits.sum() + aux).backward()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_learner_step_and_cpu_agreement() -> None:
    from model.learner import OnlineLearner

    arrays = random_arrays(SPEC, 64)
    cfg = small(Arch.ZENITH_PP, bf16_autocast=True)
    learner = OnlineLearner(build_model(SPEC, cfg, "cuda"), SPEC)
    res = learner.step(arrays)
    assert res.probs.shape == (64, len(SPEC.tasks)) and learner.autocast
    cpu = build_model(SPEC, cfg, "cpu")
    gpu = build_model(SPEC, cfg, "cuda")
    torch.testing.assert_close(cpu.predict(Batch.from_arrays(arrays)),
                               gpu.predict(Batch.from_arrays(arrays, "cuda")).cpu(), rtol=1e-3, atol=1e-4)

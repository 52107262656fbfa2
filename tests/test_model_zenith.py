"""Zenith's modules: RSA arithmetic, tokenwise independence, TSMoE routing and balancing."""

from __future__ import annotations

import pytest
import torch

from model.batch import Batch
from model.config import Arch, Boost, ModelConfig, preset
from model.factory import build_model, random_arrays
from model.spec import DenseFeature, FeatureSpec, IdFeature, SequenceFeature, Task, default_live_spec
from model.zenith import RSA, TMHSA, TSMoE, TSwiGLU, ZenithRanker

torch.set_num_threads(2)


@pytest.mark.parametrize(("t", "d", "k"), [(12, 48, 24), (12, 48, 96), (8, 32, 32), (6, 64, 32), (10, 20, 6)])
def test_rsa_retokenization_arithmetic(t: int, d: int, k: int) -> None:
    torch.manual_seed(0)
    rsa = RSA(t, d, k)
    x = torch.randn(3, t, d)
    out = rsa(x)
    assert rsa.t_out * d == t * k and out.shape == (3, t * k // d, d)
    # O = (X Xᵀ / (D·T)) X W_R (no softmax), plus the tokenwise residual, reshaped row-major T×k -> T̂×d
    o = (x @ x.transpose(1, 2) / (d * t)) @ x @ rsa.w_r.weight.T
    r = torch.einsum("btd,tdk->btk", x, rsa.residual.weight) + rsa.residual.bias
    pre = (o + r).reshape(3, t * k // d, d)
    torch.testing.assert_close(out, rsa.norm(pre), rtol=1e-4, atol=1e-4)
    if k < d and d % k == 0:  # new token 0 is made of fragments of old tokens 0..d/k-1
        torch.testing.assert_close(pre[:, 0], (o + r)[:, : d // k].reshape(3, d))


def test_rsa_rejects_bad_k() -> None:
    with pytest.raises(AssertionError, match="choose k so that T\\*k % D == 0"):
        RSA(12, 64, 20)


def test_rsa_schedule_alternates_token_counts() -> None:
    cfg = ModelConfig(arch=Arch.ZENITH, d_model=48, n_layers=3, rsa_k=24)
    assert cfg.rsa_schedule(12) == [(12, 24, 6), (6, 96, 12), (12, 24, 6)]
    model = build_model(default_live_spec(), cfg, "cpu")
    assert isinstance(model, ZenithRanker) and model.t_final == 6
    outs = model.token_outputs(Batch.from_arrays(random_arrays(model.spec, 4)))
    assert [o.shape[1] for o in outs] == [12, 6, 12, 6]


def test_tokenwise_layers_keep_tokens_independent() -> None:
    """Changing token 2's weights changes token 2's output only (before the norm there is no mixing)."""
    torch.manual_seed(0)
    ffn = TSwiGLU(4, 8, 16)
    x = torch.randn(2, 4, 8)
    base = ffn.down(torch.nn.functional.silu(ffn.up(x)[..., :16]) * ffn.up(x)[..., 16:])
    with torch.no_grad():
        ffn.up.weight[2] += 1.0
    new = ffn.down(torch.nn.functional.silu(ffn.up(x)[..., :16]) * ffn.up(x)[..., 16:])
    changed = (new - base).abs().sum(dim=(0, 2)) > 0
    assert changed.tolist() == [False, False, True, False]


def test_tmhsa_has_per_token_projections_and_mixes_tokens() -> None:
    torch.manual_seed(0)
    att = TMHSA(5, 16, 4)
    assert att.qkv.weight.shape == (5, 16, 48)
    x = torch.randn(2, 5, 16)
    y = att(x)
    x2 = x.clone()
    x2[:, 4] += 1.0
    assert (att(x2)[:, 0] - y[:, 0]).abs().max() > 0  # token 0 attends to token 4


def test_tsmoe_routes_to_several_experts_and_balancing_loss_falls() -> None:
    torch.manual_seed(0)
    moe = TSMoE(n_tokens=3, d_model=16, hidden=16, n_experts=4, top_k=1)
    with torch.no_grad():  # start badly imbalanced: every token prefers expert 0
        moe.router[:, :, 0] += 0.5
    x = torch.randn(512, 3, 16) + 0.5
    _, aux0 = moe(x)
    assert aux0.item() > 2.5  # E=4 with ~90% of the load on one expert (1.0 = balanced)
    opt = torch.optim.Adam(moe.parameters(), lr=0.02)
    target = torch.randn(512, 3, 16)
    for _ in range(100):
        y, aux = moe(x)
        loss = (y - target).pow(2).mean() + 0.1 * aux
        opt.zero_grad()
        loss.backward()
        opt.step()
    _, aux1 = moe(x)
    assert aux1.item() < 1.2
    assert (moe.last_load > 0.1).sum(-1).min() >= 3  # with top-1, samples of every token go to >= 3 experts


def test_zenith_pp_with_tsmoe_routes_to_more_than_one_expert() -> None:
    spec = default_live_spec()
    model = build_model(spec, preset(Arch.ZENITH_PP, "S", spec), "cpu")
    logits, aux = model(Batch.from_arrays(random_arrays(spec, 64)))
    assert logits.shape == (64, len(spec.tasks)) and aux.item() > 0
    for moe in model.moe_layers():
        assert (moe.last_load > 0).sum(-1).min() >= 2


def test_zenith_pp_tswiglu_variant() -> None:
    spec = default_live_spec()
    model = build_model(spec, preset(Arch.ZENITH_PP, "S", spec, boost=Boost.TSWIGLU), "cpu")
    assert not model.moe_layers()
    assert model(Batch.from_arrays(random_arrays(spec, 8)))[1].item() == 0.0


@pytest.mark.parametrize("n_own", [1, 3])
def test_token_count_follows_the_spec(n_own: int) -> None:
    spec = FeatureSpec(
        ids=tuple(IdFeature(f"id{i}") for i in range(n_own)) + (IdFeature("ctx", group="c"),),
        sequences=(SequenceFeature("hist", target="id0"),),
        dense=(DenseFeature("x", "c"), DenseFeature("y", "d")),
        tasks=(Task("t", "y"),), seq_len=5,
    )
    t = spec.n_tokens()
    assert t == n_own + 1 + 2
    d = 4 * t
    model = build_model(spec, ModelConfig(arch=Arch.ZENITH, d_model=d, rsa_k=d // 2 if t % 2 == 0 else d), "cpu")
    outs = model.token_outputs(Batch.from_arrays(random_arrays(spec, 3)))
    assert outs[0].shape == (3, t, d)

"""The learned entropy model: a valid prior, tails found on its CDF, tables that code,
and the device's numpy path agreeing with the torch one it was exported from."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tandem import entropy_codec
from tandem.entropy import TAIL_MASS, FactorizedPrior, RatePoints
from tandem.entropy_points import information_bits


def _laplace(n: int, channels: int, scale: float, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    u = torch.rand(n, channels, 4, 4, generator=gen) - 0.5
    return -scale * torch.sign(u) * torch.log1p(-2 * u.abs())  # Laplace(0, scale)


def _fit(prior: FactorizedPrior, y: torch.Tensor, steps: int = 300) -> None:
    """Fit the prior alone to noisy ``y`` by maximum likelihood."""
    opt = torch.optim.Adam(prior.parameters(), lr=0.02)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        noisy = y + torch.rand(y.shape, generator=gen) - 0.5
        loss = -torch.log2(prior.likelihood(noisy)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_bin_masses_over_all_integers_sum_to_one_for_any_weights() -> None:
    prior = FactorizedPrior(3)
    with torch.no_grad():
        for p in prior.parameters():
            p.add_(torch.randn(p.shape))  # arbitrary weights: monotone by construction
    grid = torch.arange(-400, 401, dtype=torch.float32).reshape(1, 1, -1, 1).expand(1, 3, -1, 1)
    mass = prior.likelihood(grid).sum(dim=2).flatten()
    assert torch.allclose(mass, torch.ones(3), atol=1e-3), mass


def test_the_quantiles_are_where_the_cdf_reaches_the_tails_and_half() -> None:
    prior = FactorizedPrior(3)
    with torch.no_grad():
        for p in prior.parameters():
            p.add_(torch.randn(p.shape))
    q = prior.quantiles()
    cdf = torch.sigmoid(prior._logits_cdf(q.reshape(3, 1, 3)).double())[:, 0, :]
    expected = torch.tensor([TAIL_MASS, 0.5, 1 - TAIL_MASS], dtype=torch.float64)
    assert torch.allclose(cdf, expected.expand(3, 3), rtol=1e-3, atol=1e-9), cdf
    assert (q[:, 0] < q[:, 1]).all() and (q[:, 1] < q[:, 2]).all()


def test_a_frozen_prior_keeps_its_quantiles_and_takes_no_gradient() -> None:
    prior = FactorizedPrior(2)
    prior.freeze()
    before = prior.quantiles().clone()
    with torch.no_grad():
        prior.biases[0].add_(5.0)  # would move every quantile, were they recomputed
    assert torch.equal(prior.quantiles(), before)
    assert not any(p.requires_grad for p in prior.parameters())


def test_a_fitted_prior_costs_close_to_the_empirical_entropy() -> None:
    """Rounded Laplace data: the model's bits per symbol approach the data's entropy."""
    y = _laplace(512, 2, scale=1.5)
    prior = FactorizedPrior(2)
    _fit(prior, y)
    symbols = torch.round(y - prior.medians.reshape(1, 2, 1, 1))
    counts = np.unique(symbols.numpy(), return_counts=True)[1] / symbols.numel()
    empirical = -(counts * np.log2(counts)).sum()  # both channels pooled: same distribution
    m = prior.medians.reshape(1, 2, 1, 1)
    with torch.no_grad():
        model = float(-torch.log2(prior.likelihood(symbols + m)).mean())
    assert model == pytest.approx(empirical, abs=0.15), (model, empirical)
    # The medians found the data's median (0), and the tails lie outside the data.
    assert prior.medians.abs().max() < 0.3
    lo, hi = prior.symbol_range()
    assert (lo <= symbols.amin(dim=(0, 2, 3)).numpy()).all()
    assert (hi >= symbols.amax(dim=(0, 2, 3)).numpy()).all()


def test_tables_are_valid_and_code_at_the_models_rate() -> None:
    y = _laplace(512, 2, scale=1.5)
    prior = FactorizedPrior(2)
    _fit(prior, y)
    tables = prior.tables()
    total = 1 << entropy_codec.PRECISION
    for c in range(2):
        row = tables.freqs[c, : tables.length[c]]
        assert row.sum() == total and row.min() >= 1
    point = RatePoints(2, 1)
    point.priors[0].load_state_dict(prior.state_dict())
    rate = point.export()[0]
    samples = [rate.quantize(s) for s in y[:64].numpy()]
    sizes = [len(entropy_codec.encode(s, rate.tables, 0)) for s in samples]
    estimate = np.mean([information_bits(rate, s) for s in samples]) / 8
    # The coder's bytes follow the tables' own estimate, within its small overhead.
    assert estimate <= np.mean(sizes) <= estimate + 4, (np.mean(sizes), estimate)


def test_the_numpy_path_matches_the_torch_path_it_was_exported_from() -> None:
    points = RatePoints(4, 2)
    with torch.no_grad():
        points.log_gains.copy_(torch.tensor([[0.0, 0.5, -0.5, 1.0], [1.0, 1.0, 0.0, 0.2]]))
    z = _laplace(8, 4, scale=2.0, seed=3)
    exported = points.export()
    for index in range(2):
        with torch.no_grad():
            s = points.symbols(z[:, :3], index)  # a width sending 3 of the 4 channels
            features = points.rounded(z[:, :3], index).features
        for i in range(len(z)):
            symbols = exported[index].quantize(z[i, :3].numpy())
            assert np.array_equal(symbols, s[i].numpy().astype(np.int32))
            payload = exported[index].encode(z[i, :3].numpy(), index, 2)
            assert entropy_codec.point_of(payload) == index
            decoded = exported[index].decode(payload, (3, 4, 4))
            assert np.allclose(decoded, features[i].numpy(), atol=1e-5)


def test_noise_in_training_and_rounding_at_inference() -> None:
    points = RatePoints(2, 1)
    z = _laplace(4, 2, scale=1.0)
    noisy = points.noisy(z, 0, torch.Generator().manual_seed(0)).features
    rounded = points.rounded(z, 0).features
    assert 0 < (noisy - z).abs().max() <= 0.5 + 1e-6
    m = points.priors[0].medians.reshape(1, 2, 1, 1)
    assert torch.allclose(torch.round(rounded - m), rounded - m, atol=1e-5)


def test_a_larger_gain_costs_more_bits() -> None:
    """The gain is the rate knob: a finer step means more symbols and more bits."""
    points = RatePoints(1, 2)
    y = _laplace(256, 1, scale=1.0)
    with torch.no_grad():
        points.log_gains.copy_(torch.tensor([[0.0], [math.log(4.0)]]))
    for index in range(2):
        _fit(points.priors[index], (y * points.gain(index, 1)).detach())
    with torch.no_grad():
        bits = [float(points.rounded(y, i).bits().mean()) for i in range(2)]
    assert bits[1] > bits[0] + 16 * 1.5, bits  # 16 symbols, about 2 bits more each


def test_priors_stay_fp32_under_mixed_precision() -> None:
    """Mixed-precision training must round and count bits as fp32 inference will: the prior
    runs in fp32 under autocast (the CPU's autocast lowers matmul as CUDA's does)."""
    torch.manual_seed(0)
    rates = RatePoints(12, 3)
    y = torch.randn(4, 12, 5, 5) * 3
    plain_q = rates.prior(1).quantiles()
    plain_l = rates.prior(1).likelihood(y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed_q = rates.prior(1).quantiles()
        mixed_l = rates.prior(1).likelihood(y.bfloat16())
    torch.testing.assert_close(mixed_q, plain_q, rtol=0, atol=0)
    torch.testing.assert_close(mixed_l, rates.prior(1).likelihood(y.bfloat16().float()))
    assert mixed_l.dtype == torch.float32 and plain_l.dtype == torch.float32

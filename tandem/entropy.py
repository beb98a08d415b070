"""The learned entropy model at the cut: a per-channel factorized prior with rate points.

What crosses the network is no longer a float tensor but integer symbols, range-coded against
a prior that was trained with the encoder (Ballé et al. 2018, "factorized prior"; the rate
term of Entropic Student and FrankenSplit). This module is the torch side: training and
export. Coding the symbols is :mod:`tandem.entropy_codec` (numpy and constriction only).

The prior of one channel is a cumulative distribution ``c(y)`` built as a small monotone
network: ``c = sigmoid ∘ f_K ∘ … ∘ f_1`` with ``f_k(x) = g_k(softplus(H_k) x + b_k)`` and
``g_k(x) = x + tanh(a_k) ⊙ tanh(x)``. Positive matrices and ``tanh(a_k) > -1`` make every
layer non-decreasing, so ``c`` is a valid CDF whatever the weights. The mass of an integer
bin is ``c(y + ½) − c(y − ½)``, computed from the logits on the side of the median where the
sigmoid is not saturated, and bounded below by :data:`LIKELIHOOD_BOUND` so that ``−log₂`` of
it stays finite.

Rate points. One encoder serves several rates: point ``i`` multiplies the encoder's output
by a learned positive per-channel gain ``g_i`` before quantizing (a larger gain, a finer
step, more bits) and has its own prior. The decoder receives ``(s + m_i) / g_i`` for symbols
``s`` and the prior's medians ``m_i``. Channels are coded independently of the width: the
encoder computes channel ``c`` the same way at every width (slimmable projection), so a
width sends a prefix of the channels and uses the prefix of each point's tables.

Training (noise) and inference (rounding):

* training: ``ŷ = y + u``, ``u ~ U(−½, ½)``, a differentiable stand-in for rounding whose
  likelihood is the rate term;
* inference: ``s = clamp(round(y − m), lo, hi)``, ``ŷ = s + m``. The clamp keeps symbols
  inside the exported table; the table's edge bins hold the prior's tail mass, so the
  clamp is priced, not silent.

Each prior's median and tails (the points where its CDF reaches :data:`TAIL_MASS` and
1 − :data:`TAIL_MASS`) are found by bisection on the CDF itself, not learned alongside it:
they centre the symbols and bound the exported alphabet, and are fixed with the prior
(:meth:`RatePoints.freeze`) before the tail is fine-tuned on the rounded features.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tandem.entropy_codec import MAX_TABLE_LENGTH, PRECISION, EntropyTables
from tandem.entropy_points import RatePoint

LIKELIHOOD_BOUND = 1e-9
"""Smallest likelihood of a bin: a symbol never costs more than about 30 bits."""

TAIL_MASS = 1e-9
"""Prior mass left outside the learned quantiles on each side."""

_SEARCH = float(1 << 16)  # the quantiles are searched in [-_SEARCH, _SEARCH]
_FAN = 63  # points per search round: each round narrows the bracket 64 times
_SEARCH_ROUNDS = 8  # 64**8 = 2**48 narrowing: a final width of 2**-30
_FILTERS = (3, 3, 3)  # hidden widths of each channel's CDF network (Ballé et al.: 1-3-3-3-1)
_INIT_SCALE = 10.0


class FactorizedPrior(nn.Module):
    """An independent learned density per channel, for integer-quantized values."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.channels = channels
        dims = (1, *_FILTERS, 1)
        scale = _INIT_SCALE ** (1 / (len(dims) - 1))
        self.matrices = nn.ParameterList()
        self.biases = nn.ParameterList()
        self.factors = nn.ParameterList()
        for i in range(len(dims) - 1):
            # softplus(init) = 1 / scale / fan_out: the initial CDF spans about ±INIT_SCALE.
            init = math.log(math.expm1(1 / scale / dims[i + 1]))
            self.matrices.append(nn.Parameter(torch.full((channels, dims[i + 1], dims[i]), init)))
            self.biases.append(nn.Parameter(torch.rand(channels, dims[i + 1], 1) - 0.5))
            if i < len(dims) - 2:
                self.factors.append(nn.Parameter(torch.zeros(channels, dims[i + 1], 1)))
        self._frozen: torch.Tensor | None = None

    def _logits_cdf(
        self, x: torch.Tensor, k: int | None = None, detach: bool = False
    ) -> torch.Tensor:
        """Pre-sigmoid CDF of ``x`` shaped (k, 1, N), one row of points for each of the first
        ``k`` channels (all by default); ``detach`` keeps gradients off the network."""
        k = self.channels if k is None else k
        # Always in fp32, mixed-precision training or not: the exported tables and medians
        # are computed in fp32, and training must round and count bits as inference will.
        with torch.autocast(x.device.type, enabled=False):
            x = x.float()
            for i, (matrix, bias) in enumerate(zip(self.matrices, self.biases, strict=True)):
                h, b = F.softplus(matrix[:k]), bias[:k]
                a = torch.tanh(self.factors[i][:k]) if i < len(self.factors) else None
                if detach:
                    h, b = h.detach(), b.detach()
                    a = a.detach() if a is not None else None
                x = torch.matmul(h, x) + b
                if a is not None:
                    x = x + a * torch.tanh(x)
        return x

    def likelihood(self, y: torch.Tensor) -> torch.Tensor:
        """Mass of the unit bin around each value of ``y`` (N, k, H, W), k <= channels."""
        k = y.shape[1]
        flat = y.float().transpose(0, 1).reshape(k, 1, -1)
        lower = self._logits_cdf(flat - 0.5, k)
        upper = self._logits_cdf(flat + 0.5, k)
        # Subtract on the side of the median where the sigmoid is not saturated.
        sign = -torch.sign(lower + upper).detach()
        mass = torch.abs(torch.sigmoid(sign * upper) - torch.sigmoid(sign * lower))
        mass = mass.clamp_min(LIKELIHOOD_BOUND)
        return mass.reshape(k, y.shape[0], *y.shape[2:]).transpose(0, 1)

    @torch.no_grad()
    def quantiles(self) -> torch.Tensor:
        """(C, 3): where each channel's CDF reaches TAIL_MASS, ½ and 1 − TAIL_MASS.

        Found by search on the logits, which the construction makes monotone, so the answer
        is the prior's own, not a separately learned estimate of it. Once :meth:`freeze` has
        run, the values it stored.
        """
        if self._frozen is not None:
            return self._frozen
        tail = math.log(1 / TAIL_MASS - 1)
        goals = torch.tensor([-tail, 0.0, tail], device=self.matrices[0].device).reshape(1, 1, 3)
        return self._search(goals)

    def _search(self, goals: torch.Tensor) -> torch.Tensor:
        """(C, G): for each channel, where the logits reach each of ``goals`` (1, 1, G).

        A (_FAN + 1)-ary search: each round evaluates _FAN points inside every bracket in one
        batched pass and keeps the sub-interval where the logits cross the goal, so the
        bracket shrinks _FAN + 1 times per pass of the network (a bisection's 2)."""
        c, g = self.channels, goals.shape[-1]
        lo = torch.full((c, 1, g, 1), -_SEARCH, device=goals.device)
        hi = torch.full((c, 1, g, 1), _SEARCH, device=goals.device)
        steps = torch.arange(1, _FAN + 1, dtype=lo.dtype, device=goals.device) / (_FAN + 1)
        for _ in range(_SEARCH_ROUNDS):
            points = lo + (hi - lo) * steps  # (C, 1, G, FAN)
            logits = self._logits_cdf(points.reshape(c, 1, g * _FAN)).reshape(points.shape)
            below = (logits < goals.unsqueeze(-1)).sum(-1, keepdim=True)  # points below a goal
            edges = torch.cat([lo, points, hi], dim=-1)  # (C, 1, G, FAN + 2)
            lo, hi = edges.gather(-1, below), edges.gather(-1, below + 1)
        return ((lo + hi) / 2)[:, 0, :, 0]

    def freeze(self) -> None:
        """Fix the prior: no more gradients, and its quantiles computed once."""
        self.requires_grad_(False)
        self._frozen = None
        self._frozen = self.quantiles()

    @property
    def medians(self) -> torch.Tensor:
        """(C,) the prior's medians."""
        return self.quantiles()[:, 1]

    def symbol_range(self) -> tuple[np.ndarray, np.ndarray]:
        """(lo, hi) integer symbols, relative to the median, covering all but the tails."""
        q = self.quantiles()
        m = q[:, 1]
        lo = torch.floor(q[:, 0] - m).clamp(max=0)
        hi = torch.ceil(q[:, 2] - m).clamp(min=0)
        # Keep the alphabet within the coder's limit, centred on the median.
        half = (MAX_TABLE_LENGTH - 1) // 2
        lo, hi = lo.clamp(min=-half), hi.clamp(max=half)
        return lo.long().cpu().numpy(), hi.long().cpu().numpy()

    @torch.no_grad()
    def tables(self) -> EntropyTables:
        """The quantized per-channel tables of this prior, as the coder uses them.

        Symbol ``s`` (relative to the median) of channel ``c`` has the bin mass at
        ``m_c + s``; the first and last bins also take the mass beyond them, since the
        encoder clamps into this range. Frequencies are rounded to sum to 2**PRECISION
        with every symbol at least 1, so any in-range symbol can be coded.
        """
        lo, hi = self.symbol_range()
        length = hi - lo + 1
        width = int(length.max())
        freqs = np.zeros((self.channels, width), np.uint32)
        m = self.medians
        for c in range(self.channels):
            s = torch.arange(int(lo[c]), int(hi[c]) + 1, dtype=torch.float32) + m[c]
            pmf = self._bin_mass(c, s)
            freqs[c, : len(pmf)] = _quantize_pmf(pmf)
        return EntropyTables(freqs, lo.astype(np.int32), length.astype(np.int32))

    def _bin_mass(self, c: int, centres: torch.Tensor) -> np.ndarray:
        """Float64 mass of each unit bin at ``centres`` of channel ``c``, tails folded in."""
        edges = torch.cat([centres - 0.5, centres[-1:] + 0.5]).reshape(1, 1, -1)
        logits = self._logits_cdf(edges.expand(self.channels, 1, -1))[c, 0].double()
        cdf = torch.sigmoid(logits).numpy()
        cdf[0], cdf[-1] = 0.0, 1.0  # the edge bins take the tails
        return np.diff(cdf)


def _quantize_pmf(pmf: np.ndarray) -> np.ndarray:
    """Integer frequencies summing to 2**PRECISION, each at least 1, close to ``pmf``."""
    total = 1 << PRECISION
    pmf = np.clip(pmf, 0, None)
    pmf = pmf / pmf.sum() if pmf.sum() > 0 else np.full_like(pmf, 1 / len(pmf))
    freqs = np.floor(pmf * (total - len(pmf))).astype(np.int64) + 1
    freqs[int(np.argmax(pmf))] += total - int(freqs.sum())
    return freqs.astype(np.uint32)


@dataclass(frozen=True)
class Coded:
    """A batch through one rate point: what the decoder sees, and what it cost."""

    features: torch.Tensor  # the decoder's input: dequantized (or noisy) and de-gained
    likelihoods: torch.Tensor  # per value, under the point's prior

    def bits(self) -> torch.Tensor:
        """Bits per sample, as the model estimates them (the rate term)."""
        return -torch.log2(self.likelihoods).flatten(1).sum(1)


def _uniform_noise(like: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Uniform noise in [-½, ½) shaped like ``like``: drawn on the CPU from the phase's
    generator whatever the device, so a GPU run draws the same noise, then moved."""
    noise = torch.rand(like.shape, generator=gen, dtype=like.dtype) - 0.5
    return noise.to(like.device)


class RatePoints(nn.Module):
    """Gains and priors of every rate point of one bottleneck (one per recipe β)."""

    def __init__(self, channels: int, points: int) -> None:
        super().__init__()
        self.log_gains = nn.Parameter(torch.zeros(points, channels))
        self.priors = nn.ModuleList(FactorizedPrior(channels) for _ in range(points))

    def __len__(self) -> int:
        return len(self.priors)

    def prior(self, point: int) -> FactorizedPrior:
        """The prior of rate point ``point``."""
        prior = self.priors[point]
        assert isinstance(prior, FactorizedPrior)
        return prior

    def gain(self, point: int, k: int) -> torch.Tensor:
        """(1, k, 1, 1) gains of the first ``k`` channels at ``point``."""
        return self.log_gains[point, :k].exp().reshape(1, k, 1, 1)

    def noisy(self, z: torch.Tensor, point: int, gen: torch.Generator) -> Coded:
        """Training path: additive uniform noise in the gained domain."""
        gain = self.gain(point, z.shape[1])
        y = z * gain
        noise = _uniform_noise(y, gen)
        y_hat = y + noise
        return Coded(y_hat / gain, self.prior(point).likelihood(y_hat))

    def straight_through(self, z: torch.Tensor, point: int, gen: torch.Generator) -> Coded:
        """End-to-end fine-tuning path: the decoder sees the symbols rounded as inference
        rounds them (gradients pass straight through the rounding), while the rate is the
        noisy estimate of :meth:`noisy`, so the prior keeps fitting what the encoder sends."""
        k = z.shape[1]
        gain = self.gain(point, k)
        y = z * gain
        m = self.prior(point).medians[:k].reshape(1, k, 1, 1)
        y_q = y + (torch.round(y - m) + m - y).detach()
        noise = _uniform_noise(y, gen)
        return Coded(y_q / gain, self.prior(point).likelihood(y + noise))

    def symbols(self, z: torch.Tensor, point: int) -> torch.Tensor:
        """Inference path, device side: integer symbols (relative to the medians), clamped
        into the exported tables' range."""
        k = z.shape[1]
        prior = self.prior(point)
        m = prior.medians[:k].reshape(1, k, 1, 1)
        lo, hi = (torch.from_numpy(v[:k]).reshape(1, k, 1, 1) for v in prior.symbol_range())
        s = torch.round(z * self.gain(point, k) - m)
        return torch.maximum(torch.minimum(s, hi.to(s.device, s.dtype)), lo.to(s.device, s.dtype))

    def dequantize(self, s: torch.Tensor, point: int) -> torch.Tensor:
        """Cloud side: the decoder's input for symbols ``s``."""
        k = s.shape[1]
        m = self.prior(point).medians[:k].reshape(1, k, 1, 1)
        return (s + m) / self.gain(point, k)

    def rounded(self, z: torch.Tensor, point: int) -> Coded:
        """What inference does, with the likelihoods of the symbols sent."""
        s = self.symbols(z, point)
        k = z.shape[1]
        m = self.prior(point).medians[:k].reshape(1, k, 1, 1)
        return Coded(self.dequantize(s, point), self.prior(point).likelihood(s + m))

    def freeze(self) -> RatePoints:
        """Fix gains and priors (what the exported tables describe); returns self in eval mode."""
        self.eval().requires_grad_(False)
        for i in range(len(self)):
            self.prior(i).freeze()
        return self

    @torch.no_grad()
    def export(self) -> list[RatePoint]:
        """Every point's gain, medians and quantized tables, as the bundle stores them."""
        return [
            RatePoint(
                gain=self.log_gains[i].exp().float().numpy().copy(),
                median=self.prior(i).medians.float().numpy().copy(),
                tables=self.prior(i).tables(),
            )
            for i in range(len(self))
        ]

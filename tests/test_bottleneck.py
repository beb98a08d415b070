"""The slimmable encoder/decoder pair and the training-time quantizer."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tandem import codec
from tandem.bottleneck import build_bottleneck, fake_quantize, width_channels

WIDTHS = [0.25, 0.5, 0.75, 1.0]


def _pair() -> tuple[torch.nn.Module, torch.nn.Module]:
    return build_bottleneck(1, 32, 8, WIDTHS, [(16, 2), (32, 2)], [(32, 2)])


def test_width_channels() -> None:
    assert [width_channels(8, w) for w in WIDTHS] == [2, 4, 6, 8]
    assert width_channels(3, 0.1) == 1


def test_each_width_sends_a_prefix_of_the_full_code() -> None:
    encoder, _ = _pair()
    encoder.eval()
    x = torch.randn(3, 1, 28, 28)
    full = encoder.encode(x, 1.0)
    assert full.shape == (3, 8, 7, 7)
    for w in WIDTHS:
        z = encoder.encode(x, w)
        assert z.shape[1] == width_channels(8, w)
        torch.testing.assert_close(z, full[:, : z.shape[1]])


def test_decoder_accepts_every_width_and_rebuilds_cut_shape() -> None:
    encoder, decoder = _pair()
    encoder.eval(), decoder.eval()
    x = torch.randn(2, 1, 28, 28)
    for w in WIDTHS:
        assert decoder.decode(encoder.encode(x, w)).shape == (2, 32, 14, 14)
    with pytest.raises(ValueError, match="expected one of"):
        decoder.decode(torch.randn(2, 3, 7, 7))


def test_repeated_channel_counts_are_refused() -> None:
    with pytest.raises(ValueError, match="repeated"):
        build_bottleneck(1, 4, 2, [0.5, 0.6], [(4, 1)], [])


def test_fake_quantize_has_the_codec_error_budget() -> None:
    z = torch.randn(4, 3, 7, 7)
    for bits in (2, 4, 8):
        fq = fake_quantize(z, bits).numpy()
        wire = np.stack([codec.decode(codec.encode(s, bits)) for s in z.numpy()])
        step = (z.amax((-2, -1)) - z.amin((-2, -1))).numpy()[..., None, None] / ((1 << bits) - 1)
        assert np.all(np.abs(fq - z.numpy()) <= step * 0.5 + 1e-6)
        # The codec stores its step in fp16, so its grid may sit slightly apart, never further
        # than the two half-step error budgets together.
        assert np.all(np.abs(fq - wire) <= step * 1.05 + 1e-6)
        assert len(np.unique(fq[0, 0])) <= 1 << bits
    torch.testing.assert_close(fake_quantize(z, 16), z)


def test_fake_quantize_passes_gradients_straight_through() -> None:
    z = torch.randn(2, 2, 4, 4, requires_grad=True)
    fake_quantize(z, 2).sum().backward()
    assert z.grad is not None and torch.count_nonzero(z.grad) > 0

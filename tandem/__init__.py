"""Tandem: split and federated edge-cloud inference.

The shared core: the model zoo, model splitting, learned bottlenecks, distillation recipes,
the wire codec, deployment bundles, data sets and the ``tandem`` command line.

The Python API for a network of your own (see :mod:`tandem.api`)::

    import tandem

    tandem.cut_points(model, example)         # every valid cut, with its costs
    tandem.split_at(model, "layer2", example)  # (head, tail), checked on the example
    tandem.build_bundle(model, "layer2", train, test, out="runs/mine")
    tandem.train_recipe("mnist", "npz:mnist.npz", out="runs/mnist")  # a zoo recipe

Those names are imported on first use, so ``import tandem`` alone loads no PyTorch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["__version__", "build_bundle", "cut_points", "split_at", "train_recipe"]

if TYPE_CHECKING:
    from tandem.api import build_bundle, cut_points, split_at, train_recipe

_API = frozenset({"build_bundle", "cut_points", "split_at", "train_recipe"})


def __getattr__(name: str) -> Any:
    """The API's functions, imported from :mod:`tandem.api` when first asked for."""
    if name in _API:
        from tandem import api

        return getattr(api, name)
    raise AttributeError(f"module 'tandem' has no attribute {name!r}")

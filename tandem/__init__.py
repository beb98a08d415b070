"""Tandem: split and federated edge-cloud inference.

The shared core: the model zoo, model splitting, learned bottlenecks, distillation recipes,
the wire codec, deployment bundles, data sets and the ``tandem`` command line.
"""

__version__ = "0.1.0"

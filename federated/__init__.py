"""Federated fine-tuning of a bundle's LoRA adapters with Flower, published into serving.

``client_app`` and ``server_app`` are the Flower app (declared in ``pyproject.toml``);
``strategies`` and ``rank`` aggregate adapters; ``updates`` compresses what clients send;
``task``, ``partition`` and ``domains`` are a client's data and training; ``publish`` writes
adapters into the cloud model repository.
"""

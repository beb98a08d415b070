"""Which training rows each client holds: Flower Datasets' partitioners over in-memory labels.

The partitioners work on a Hugging Face ``Dataset``; here it is built from the label array
alone (plus each row's index), so nothing is downloaded and the images stay in NumPy.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from datasets import Dataset
from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, Partitioner

Scheme = Literal["iid", "dirichlet"]


def partition_rows(
    labels: np.ndarray,
    num_partitions: int,
    partition: int,
    *,
    scheme: Scheme = "dirichlet",
    alpha: float = 0.5,
    seed: int = 0,
) -> np.ndarray:
    """Row indices of ``labels`` that client ``partition`` of ``num_partitions`` holds.

    ``iid`` deals rows out evenly at random; ``dirichlet`` skews each client's label mix by
    a Dirichlet(``alpha``) draw per label (smaller alpha, more skew). Deterministic per seed,
    and the partitions of one call's arguments are disjoint and cover every row.
    """
    if not 0 <= partition < num_partitions:
        raise ValueError(f"partition {partition} is not in [0, {num_partitions})")
    if num_partitions > len(labels):
        raise ValueError(f"{num_partitions} partitions of {len(labels)} rows")
    partitioner = _partitioner(scheme, num_partitions, len(labels), alpha, seed)
    partitioner.dataset = Dataset.from_dict(
        {"label": labels.astype(np.int64), "row": np.arange(len(labels))}
    )
    rows = np.asarray(partitioner.load_partition(partition)["row"], dtype=np.int64)
    return np.sort(rows)


def _partitioner(
    scheme: Scheme, num_partitions: int, rows: int, alpha: float, seed: int
) -> Partitioner:
    if scheme == "iid":
        return IidPartitioner(num_partitions)
    if scheme == "dirichlet":
        return DirichletPartitioner(
            num_partitions,
            partition_by="label",
            alpha=alpha,
            # Every client gets enough rows for a batch or two; the partitioner redraws until so.
            min_partition_size=min(10, rows // num_partitions),
            self_balancing=True,
            seed=seed,
        )
    raise ValueError(f"unknown partitioner {scheme!r}: expected 'iid' or 'dirichlet'")

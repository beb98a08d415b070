"""Running the Flower app in Flower's simulation engine from tests.

Ray gives its raylet a fixed 30 s to start; on a loaded two-core machine it sometimes takes
longer, and the run then fails before any of our code runs. That start (and only that) is
retried once, into a fresh output directory.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from flwr.clientapp import ClientApp
from flwr.simulation import run_simulation

from federated.server_app import make_server_app

BACKEND: dict[str, Any] = {"client_resources": {"num_cpus": 1}, "init_args": {"num_cpus": 2}}
RAY_START_FAILURES = ("timed out during startup", "gcs_server_port")


def ray_did_not_start(exc: BaseException) -> bool:
    """Whether ``exc`` comes from Ray failing to start, not from the app."""
    chain: BaseException | None = exc
    while chain is not None:
        if any(words in str(chain) for words in RAY_START_FAILURES):
            return True
        chain = chain.__cause__ or chain.__context__
    return False


def simulate(settings: dict[str, Any], client_app: ClientApp, nodes: int) -> dict[str, Any]:
    """Run a federation with run config ``settings`` (``out`` required); its result.json."""
    for attempt in range(2):
        out = Path(settings["out"]) / f"attempt{attempt}"
        run = {**settings, "out": str(out)}
        try:
            run_simulation(make_server_app(run), client_app, nodes, backend_config=BACKEND)
        except RuntimeError as exc:
            if attempt or not ray_did_not_start(exc):
                raise
            continue
        return dict(json.loads((out / "result.json").read_text()))
    raise AssertionError("unreachable")

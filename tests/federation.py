"""Running the Flower app in Flower's simulation engine from tests.

Ray gives its raylet a fixed 30 s to start; on a loaded two-core machine it sometimes takes
longer (or a raylet fails to come up at all), and the run then fails before any of our code
runs. That start, and only that, is retried up to twice, each time into a fresh output
directory.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import ray
from flwr.clientapp import ClientApp
from flwr.simulation import run_simulation

from tandem.federated.server_app import make_server_app

T = TypeVar("T")

BACKEND: dict[str, Any] = {"client_resources": {"num_cpus": 1}, "init_args": {"num_cpus": 2}}
RAY_START_FAILURES = ("timed out during startup", "gcs_server_port")
RAY_START_ATTEMPTS, RAY_RETRY_PAUSE_S = 3, 5.0


def ray_did_not_start(exc: BaseException) -> bool:
    """Whether ``exc`` comes from Ray failing to start, not from the app."""
    chain: BaseException | None = exc
    while chain is not None:
        if any(words in str(chain) for words in RAY_START_FAILURES):
            return True
        chain = chain.__cause__ or chain.__context__
    return False


def retrying_ray_start(run: Callable[[int], T]) -> T:
    """``run(attempt)``, again (after Ray's leftovers are shut down and a pause) while it
    fails because Ray did not start; any other failure is raised at once."""
    for attempt in range(RAY_START_ATTEMPTS):
        try:
            return run(attempt)
        except RuntimeError as exc:
            if attempt == RAY_START_ATTEMPTS - 1 or not ray_did_not_start(exc):
                raise
            ray.shutdown()
            time.sleep(RAY_RETRY_PAUSE_S)
    raise AssertionError("unreachable")


def simulate(settings: dict[str, Any], client_app: ClientApp, nodes: int) -> dict[str, Any]:
    """Run a federation with run config ``settings`` (``out`` required); its result.json."""

    def attempt(n: int) -> dict[str, Any]:
        out = Path(settings["out"]) / f"attempt{n}"
        run = {**settings, "out": str(out)}
        run_simulation(make_server_app(run), client_app, nodes, backend_config=BACKEND)
        return dict(json.loads((out / "result.json").read_text()))

    # Flower's Ray backend sets PYTHONPATH to this process's sys.path for Ray's workers, in
    # os.environ: every process a later test starts would inherit it.
    saved = os.environ.get("PYTHONPATH")
    try:
        return retrying_ray_start(attempt)
    finally:
        if saved is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = saved

"""``tandem fed simulate``: a whole federation on this machine, in Flower's simulation engine.

For real devices, run the same app with Flower's own tools (``flwr run``, ``flower-superlink``,
``flower-supernode``); the README shows how. Flower and torch are imported inside the
command, so ``tandem --help`` stays quick.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path
from typing import Any


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``fed simulate`` to the ``tandem`` parser."""
    fed = sub.add_parser("fed", help="federated LoRA fine-tuning with Flower")
    commands = fed.add_subparsers(dest="fed_command", required=True)
    p = commands.add_parser("simulate", help="run a federation in Flower's simulation engine")
    p.add_argument("--bundle", required=True, type=Path, help="the bundle to fine-tune")
    p.add_argument("--clients", type=int, default=8, help="simulated devices")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a run-config setting, as in pyproject's [tool.flwr.app.config], e.g. "
        "--set num-rounds=10 --set strategy=ffa",
    )
    p.add_argument("--out", type=Path, help="keep result.json here (default: a temp directory)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON document")
    p.set_defaults(func=cmd_simulate)


def parse_settings(pairs: list[str]) -> dict[str, Any]:
    """``--set KEY=VALUE`` strings as run-config values, in the grammar ``tandem train --set``
    uses (:func:`tandem.config.parse_assignment`); keys spelt with ``-``, as Flower's are."""
    from tandem.config import parse_assignment

    settings: dict[str, Any] = {}
    for pair in pairs:
        key, value = parse_assignment(pair)
        settings[key.replace("_", "-")] = value
    return settings


def cmd_simulate(args: argparse.Namespace) -> int:
    """Validate the settings, run the federation, print its summary."""
    from tandem.federated.config import FedConfig

    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    if args.clients < 1:
        raise ValueError("--clients must be at least 1")
    with tempfile.TemporaryDirectory(prefix="tandem-fed-") as tmp:
        out = args.out or Path(tmp)
        settings = {"min-nodes": args.clients, **parse_settings(args.set)}
        settings.update(bundle=str(args.bundle), out=str(out))
        FedConfig.from_run_config(settings)  # refuse bad settings before Ray starts
        result = simulate(settings, args.clients, out)
    print(json.dumps(result) if args.json else summary_text(result))
    return 0


def simulate(settings: dict[str, Any], clients: int, out: Path) -> dict[str, Any]:
    """Run a federation of ``clients`` in Flower's simulation engine (Ray, in-process) with the
    run config ``settings`` (whose ``out`` is ``out``); its result.json."""
    from flwr.simulation import run_simulation

    from tandem.federated.client_app import app as client_app
    from tandem.federated.server_app import make_server_app

    backend: dict[str, Any] = {
        "client_resources": {"num_cpus": 1},
        "init_args": {"num_cpus": os.cpu_count() or 1},
    }
    run_simulation(make_server_app(settings), client_app, clients, backend_config=backend)
    path = out / "result.json"
    if not path.is_file():
        raise RuntimeError("the federation stopped without a result; run with -v for its log")
    result: dict[str, Any] = json.loads(path.read_text())
    return result


def summary_text(result: dict[str, Any]) -> str:
    """A federation's result for a terminal: one line per round, then the totals."""
    lines = [f"strategy {result['strategy']}: frozen bundle {result['frozen_accuracy']:.4f}"]
    for r in result["rounds"]:
        sent = max((c["bytes_up"] for c in r["clients"]), default=0)
        lines.append(
            f"round {r['round']}: {r['replies']} replies, {r['failures']} failed, "
            f"{r['missing']} missing{' (skipped)' if r['skipped'] else ''}, "
            f"accuracy {r['accuracy']:.4f}, up to {sent:,} bytes sent per client"
        )
    lines.append(f"global adapter {result['global_accuracy']:.4f}")
    lines += [f"published {p}" for p in result["published"]]
    return "\n".join(lines)

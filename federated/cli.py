"""``tandem fed simulate``: a whole federation on this machine, on Flower's simulation runtime.

For real devices, run the same app with Flower's own tools (``flwr run``, ``flower-superlink``,
``flower-supernode``); the README shows how. Flower and torch are imported inside the
command, so ``tandem --help`` stays quick.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tandem.cli import CommandError

if TYPE_CHECKING:
    from tandem.federated.config import FedConfig


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``fed simulate`` to the ``tandem`` parser."""
    fed = sub.add_parser("fed", help="federated LoRA fine-tuning with Flower")
    commands = fed.add_subparsers(dest="fed_command", required=True)
    p = commands.add_parser(
        "simulate",
        help="run a federation on Flower's simulation runtime (a local SuperLink and Ray)",
    )
    p.add_argument("--bundle", required=True, type=Path, help="the bundle to fine-tune")
    p.add_argument("--clients", type=int, default=8, help="simulated devices")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a run-config setting (FedConfig's keys, - or _ alike), VALUE a TOML literal or "
        "plain text as for tandem train --set, e.g. --set num-rounds=10 --set strategy=ffa "
        "(repeatable)",
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
    """Validate the settings and the bundle, run the federation, print its summary."""
    if args.clients < 1:
        raise ValueError("--clients must be at least 1")
    with tempfile.TemporaryDirectory(prefix="tandem-fed-out-") as tmp:
        out = args.out or Path(tmp)
        settings = {"min-nodes": args.clients, **parse_settings(args.set)}
        settings.update(bundle=str(args.bundle), out=str(out))
        result = simulate(settings, args.clients, out)
    print(json.dumps(result) if args.json else summary_text(result))
    return 0


def check(settings: dict[str, Any]) -> FedConfig:
    """The validated settings, after checking what Flower's processes would otherwise find
    wrong only once Ray is up: the bundle is one, and the data spec names data."""
    from tandem.bundle import read_manifest
    from tandem.data import check_spec
    from tandem.federated.config import FedConfig

    cfg = FedConfig.from_run_config(settings)
    read_manifest(Path(cfg.bundle))
    check_spec(cfg.data)
    return cfg


def simulate(settings: dict[str, Any], clients: int, out: Path) -> dict[str, Any]:
    """Run a federation of ``clients`` on Flower's simulation runtime (a local SuperLink,
    :mod:`tandem.federated.runtime`) with the run config ``settings`` (whose ``out`` is
    ``out``); its result.json. Settings and bundle are checked before anything starts."""
    from tandem.federated.runtime import run_federation

    cfg = check(settings)
    run_federation(cfg, clients)
    path = out / "result.json"
    if not path.is_file():
        raise CommandError("the federation stopped without a result; run with -v for its log")
    result: dict[str, Any] = json.loads(path.read_text())
    return result


def summary_text(result: dict[str, Any]) -> str:
    """A federation's result for a terminal: one line per round, then the totals."""
    lines = [f"strategy {result['strategy']}: frozen bundle {result['frozen_accuracy']:.4f}"]
    for r in result["rounds"]:
        down = max((c["bytes_down"] for c in r["clients"]), default=0)
        up = max((c["bytes_up"] for c in r["clients"]), default=0)
        lines.append(
            f"round {r['round']}: {r['replies']} replies, {r['failures']} failed, "
            f"{r['missing']} missing{' (skipped)' if r['skipped'] else ''}, "
            f"accuracy {r['accuracy']:.4f}, up to {down:,} bytes down and {up:,} up per client"
        )
    lines.append(f"global adapter {result['global_accuracy']:.4f}")
    lines += [f"published {p}" for p in result["published"]]
    return "\n".join(lines)

"""``tandem edge run``: the edge daemon from the command line.

Heavy imports happen inside the command, so ``tandem --help`` stays quick.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from pathlib import Path
from typing import Any

from tqdm import tqdm


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``edge run`` to the ``tandem`` parser."""
    edge = sub.add_parser("edge", help="the edge client daemon")
    commands = edge.add_subparsers(dest="edge_command", required=True)
    p = commands.add_parser("run", help="run the head on a source's inputs, serve them via cloud")
    p.add_argument("--bundle", required=True, type=Path, help="the bundle whose head runs here")
    p.add_argument("--cloud", required=True, help="HOST:PORT of `tandem cloud serve`")
    p.add_argument(
        "--source", required=True, help="DIR | digits | npz:PATH | jsonl:PATH | - (stdin)"
    )
    p.add_argument("--sink", default="-", help="JSON-lines output file, or - for stdout")
    p.add_argument("--spool", type=Path, help="spool database (default: SINK.spool)")
    p.add_argument("--model", help="model name on the server (default: the bundle's)")
    p.add_argument("--adapter", default="", help="LoRA adapter to ask for")
    p.add_argument("--adapter-version", default="", help="its version (default: the newest)")
    p.add_argument(
        "--head-adapter", type=Path,
        help="head LoRA directory to merge in, e.g. BUNDLE/head-adapters/NAME/VERSION; a "
        "federation's also picks --adapter, --adapter-version, --width and --bits unless given",
    )  # fmt: skip
    p.add_argument("--width", type=float, help="fix the bottleneck width (default: policy)")
    p.add_argument("--bits", type=int, help="fix the bits per value (default: policy)")
    p.add_argument("--slo-ms", type=float, default=100.0, help="latency target for the policy")
    p.add_argument("--concurrency", type=int, default=32, help="requests in flight")
    p.add_argument("--head-batch", type=int, default=32, help="inputs per head forward pass")
    p.add_argument("--limit", type=int, help="only the first N inputs of the source")
    p.add_argument("--no-fallback", action="store_true", help="never serve locally")
    p.add_argument(
        "--fallback-after-s", type=float, default=3.0,
        help="retrying the cloud this long means unreachable: serve locally",
    )  # fmt: skip
    p.add_argument("--deadline-ms", type=int, default=0, help="per-request server deadline")
    p.add_argument("--tls", action="store_true", help="TLS with the system's trust roots")
    p.add_argument("--ca", type=Path, help="CA certificate to trust (implies TLS)")
    p.add_argument("--cert", type=Path, help="client certificate for mTLS")
    p.add_argument("--key", type=Path, help="client private key for mTLS")
    p.add_argument("--token-file", type=Path, help="file holding a bearer token")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON document")
    p.set_defaults(func=cmd_run)


def _config(args: argparse.Namespace) -> Any:
    from pydantic import ValidationError

    from tandem.config import settings_error
    from tandem.edge.config import DaemonConfig

    fields = {
        k: getattr(args, k)
        for k in (
            "bundle",
            "cloud",
            "source",
            "sink",
            "spool",
            "model",
            "adapter",
            "adapter_version",
            "head_adapter",
            "width",
            "bits",
            "slo_ms",
            "concurrency",
            "head_batch",
            "limit",
            "fallback_after_s",
            "deadline_ms",
            "tls",
            "ca",
            "cert",
            "key",
            "token_file",
        )
        if getattr(args, k) is not None
    }
    fields["fallback"] = not args.no_fallback
    try:
        return DaemonConfig.model_validate(fields)
    except ValidationError as exc:
        raise settings_error("edge run options", exc) from exc


def cmd_run(args: argparse.Namespace) -> int:
    """Run the daemon over the source; print its summary."""
    from tandem.edge.daemon import EdgeDaemon

    cfg = _config(args)

    async def main() -> dict[str, Any]:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        show = not args.json and sys.stderr.isatty()
        with tqdm(desc="inputs", disable=not show, leave=False) as bar:
            return await EdgeDaemon(cfg, progress=bar.update, stop=stop).run()

    summary = asyncio.run(main())
    if args.json:
        print(json.dumps(summary))
    else:
        print(summary_text(summary))
    return 0


def summary_text(s: dict[str, Any]) -> str:
    """A few human-readable lines for a run summary."""
    lat = s["latency_ms"]
    acc = f"{100 * s['accuracy']:.2f}%" if s["accuracy"] is not None else "n/a (no labels)"
    size = f"{s['bytes_per_sample']:.1f}" if s["bytes_per_sample"] is not None else "-"
    pct = "/".join(f"{lat[k]:.1f}" if lat[k] is not None else "-" for k in ("p50", "p95", "p99"))
    return "\n".join(
        [
            f"inputs {s['inputs']}: {s['served']} served ({s['served_locally']} locally), "
            f"{s['errors']} errors, {s['retries']} retries",
            f"accuracy {acc}; {size} bytes/sample sent",
            f"latency p50/p95/p99 {pct} ms; {s['inputs_per_s'] or 0:.0f} inputs/s",
        ]
    )

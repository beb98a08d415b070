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
    p = commands.add_parser(
        "run", help="run the head on a source's inputs, serve them via cloud",
        description="Exit status: 0 every input served; 1 some inputs failed (their error lines "
        "are in the sink); 2 a usage or set-up error; 3 gave up on an unreachable cloud "
        "(--give-up-after-s), the inputs left pending in the spool for the next run.",
    )  # fmt: skip
    p.add_argument("--bundle", required=True, type=Path, help="the bundle whose head runs here")
    p.add_argument("--cloud", required=True, help="HOST:PORT of `tandem cloud serve`")
    p.add_argument(
        "--source",
        required=True,
        help="DIR | digits | npz:PATH | imagefolder:DIR | jsonl:PATH | - (stdin)",
    )
    p.add_argument("--sink", default="-", help="JSON-lines output file, or - for stdout")
    p.add_argument(
        "--spool", type=Path,
        help="spool database (default: SINK.spool; with the stdout sink, a temporary one, "
        "kept and named only if inputs are left pending)",
    )  # fmt: skip
    p.add_argument(
        "--fresh", action="store_true",
        help="discard the spool's pending inputs and source cursors: read the source again "
        "from its start (a file sink is appended to)",
    )  # fmt: skip
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
    p.add_argument(
        "--point", type=int,
        help="fix the entropy codec's rate point, instead of --bits (default: policy)",
    )  # fmt: skip
    p.add_argument("--slo-ms", type=float, default=100.0, help="latency target for the policy")
    p.add_argument("--concurrency", type=int, default=32, help="requests in flight")
    p.add_argument(
        "--transport", choices=("stream", "unary"), default="stream",
        help="stream: one InferStream, each request its payload and a few bytes; unary: a "
        "call per request, each carrying the model's names",
    )  # fmt: skip
    p.add_argument("--head-batch", type=int, default=32, help="inputs per head forward pass")
    p.add_argument(
        "--runtime", choices=("torch", "onnx"), default="torch",
        help="what runs the head: PyTorch, or ONNX Runtime on the head `tandem export BUNDLE "
        "--onnx` wrote (no PyTorch needed on the device; no local fallback)",
    )  # fmt: skip
    p.add_argument("--limit", type=int, help="only the first N inputs of the source")
    p.add_argument("--no-fallback", action="store_true", help="never serve locally")
    p.add_argument(
        "--fallback-after-s", type=float, default=3.0,
        help="retrying the cloud this long means unreachable: serve locally",
    )  # fmt: skip
    p.add_argument(
        "--give-up-after-s", type=float,
        help="with --no-fallback: stop after retrying an unreachable cloud this long, leaving "
        "the inputs in the spool (exit status 3) (default: retry until it answers)",
    )  # fmt: skip
    p.add_argument("--deadline-ms", type=int, default=0, help="per-request server deadline")
    p.add_argument("--tls", action="store_true", help="TLS with the system's trust roots")
    p.add_argument("--ca", type=Path, help="CA certificate to trust (implies TLS)")
    p.add_argument("--cert", type=Path, help="client certificate for mTLS")
    p.add_argument("--key", type=Path, help="client private key for mTLS")
    p.add_argument("--token-file", type=Path, help="file holding a bearer token")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON document")
    p.set_defaults(func=cmd_run, stdout_taken=results_on_stdout)


def results_on_stdout(args: argparse.Namespace) -> bool:
    """Whether the run's result lines go to stdout (the stdout sink)."""
    from tandem.edge.sinks import STDOUT_SINKS

    return bool(args.sink in STDOUT_SINKS)


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
            "point",
            "slo_ms",
            "concurrency",
            "transport",
            "head_batch",
            "runtime",
            "limit",
            "fallback_after_s",
            "give_up_after_s",
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
    fields["fresh"] = args.fresh
    try:
        return DaemonConfig.model_validate(fields)
    except ValidationError as exc:
        raise settings_error("edge run options", exc) from exc


def cmd_run(args: argparse.Namespace) -> int:
    """Run the daemon over the source; print its summary (on stderr when the results go to
    stdout); return the exit status documented in the parser's description."""
    from tandem.edge.daemon import EdgeDaemon
    from tandem.edge.stats import REPORT_EVERY_S

    cfg = _config(args)
    # Off a terminal there is no progress bar: a heartbeat says the run is alive instead.
    on_tty = sys.stderr.isatty()

    async def main() -> dict[str, Any]:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        with tqdm(desc="inputs", disable=args.json or not on_tty, leave=False) as bar:
            daemon = EdgeDaemon(
                cfg, progress=bar.update, stop=stop, notify=_notice,
                heartbeat_s=None if on_tty else REPORT_EVERY_S,
            )  # fmt: skip
            return await daemon.run()

    summary = asyncio.run(main())
    # Results on stdout are JSON lines, one per input: the summary must not be one of them.
    out = sys.stderr if results_on_stdout(args) else sys.stdout
    print(json.dumps(summary) if args.json else summary_text(summary), file=out, flush=True)
    if summary["gave_up"]:
        print(f"tandem: error: {summary['gave_up']}; {_left(summary)}", file=sys.stderr)
        return GAVE_UP
    return FAILED_INPUTS if summary["errors"] else 0


FAILED_INPUTS = 1
"""Exit status of a run in which some inputs failed (usage and set-up errors are 2)."""
GAVE_UP = 3
"""Exit status of a run that gave up on an unreachable cloud, leaving inputs in the spool."""


def _notice(message: str) -> None:
    """One line on stderr, without breaking a progress bar."""
    tqdm.write(f"tandem: {message}", file=sys.stderr)


def summary_text(s: dict[str, Any]) -> str:
    """A few human-readable lines for a run summary."""
    lat = s["latency_ms"]
    if s["accuracy"] is not None:
        acc = f"{100 * s['accuracy']:.2f}% of {s['labelled']} labelled"
    elif s["served"] == 0:
        acc = "- (no input served)"
    else:
        acc = "n/a (no labels)"
    size = f"{s['bytes_per_sample']:.1f}" if s["bytes_per_sample"] is not None else "-"
    pct = "/".join(f"{lat[k]:.1f}" if lat[k] is not None else "-" for k in ("p50", "p95", "p99"))
    lines = [
        f"inputs {s['inputs']}: {s['served']} served ({s['served_locally']} locally), "
        f"{s['errors']} failed, {s['retries']} retries",
        f"accuracy {acc}; {size} bytes/sample sent",
        f"latency p50/p95/p99 {pct} ms; {s['inputs_per_s'] or 0:.0f} inputs/s",
    ]
    if s["pending"]:
        lines.append(_left(s))
    return "\n".join(lines)


def _left(s: dict[str, Any]) -> str:
    # The spool named explicitly: with the stdout sink it was a temporary one, which a plain
    # rerun would not find (for stdin, it holds the inputs' only copy).
    return (
        f"{s['pending']} inputs left pending in spool {s['spool']}: serve them with "
        f"--spool {s['spool']}"
    )

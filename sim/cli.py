"""``tandem sim``: the link emulator (and, later, the simulator) from the command line."""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
from typing import Any


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``sim emulate`` to the ``tandem`` parser."""
    sim = sub.add_parser("sim", help="network simulator and trace-driven link emulator")
    commands = sim.add_subparsers(dest="sim_command", required=True)
    p = commands.add_parser("emulate", help="a TCP proxy shaped by uplink/downlink traces")
    trace_help = "trace file (Mahimahi or 'time_s mbps'), or const:MBPS, steps:A,B@S, ..."
    p.add_argument("--uplink", required=True, help=trace_help)
    p.add_argument("--downlink", required=True, help=trace_help)
    p.add_argument("--delay-ms", type=float, default=0.0, help="one-way propagation delay")
    p.add_argument("--jitter-ms", type=float, default=0.0, help="sigma of |normal| extra delay")
    p.add_argument("--loss", type=float, default=0.0, help="packet loss probability, [0, 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT (port 0: any free)")
    p.add_argument("--upstream", required=True, help="HOST:PORT of the server behind the link")
    p.add_argument("--json", action="store_true", help="print one JSON line once listening")
    p.set_defaults(func=cmd_emulate)


def cmd_emulate(args: argparse.Namespace) -> int:
    """Relay until SIGTERM or SIGINT, then close every connection and return 0."""
    from sim.emulator import LinkEmulator
    from sim.link import Link
    from sim.traces import parse_spec
    from tandem.address import format_address, parse_address

    upstream, listen = parse_address(args.upstream), parse_address(args.listen)
    links = [
        Link(
            parse_spec(spec),
            args.delay_ms / 1000,
            jitter_s=args.jitter_ms / 1000,
            loss=args.loss,
            seed=args.seed + i,
        )
        for i, spec in enumerate((args.uplink, args.downlink))
    ]
    emulator = LinkEmulator(links[0], links[1], upstream, listen)

    async def run() -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        port = await emulator.start()
        _ready(args, format_address(listen[0], port), links)
        await stop.wait()
        await emulator.close()

    asyncio.run(run())
    return 0


def _ready(args: argparse.Namespace, address: str, links: list[Any]) -> None:
    doc = {
        "event": "listening",
        "address": address,
        "upstream": args.upstream,
        "uplink": {"trace": links[0].trace.name, "mean_mbps": links[0].trace.mean_mbps},
        "downlink": {"trace": links[1].trace.name, "mean_mbps": links[1].trace.mean_mbps},
        "delay_ms": args.delay_ms,
    }
    if args.json:
        print(json.dumps(doc), flush=True)
    else:
        up, down = doc["uplink"], doc["downlink"]
        print(
            f"emulating {up['trace']} up ({up['mean_mbps']:.2f} Mbit/s) and {down['trace']} down "
            f"({down['mean_mbps']:.2f} Mbit/s), {args.delay_ms:g} ms one way, on {address} "
            f"-> {args.upstream}",
            flush=True,
        )

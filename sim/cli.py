"""``tandem sim``: the simulator's scenarios, reports and sweeps, and the link emulator.

Heavy imports (numpy, matplotlib, torch via the profiles) happen inside the commands, so
``tandem --help`` stays quick.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm import tqdm

from tandem.progress import bar as progress_bar

if TYPE_CHECKING:
    from tandem.sim.validate import Wiring


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``sim run``, ``sim sweep`` and ``sim emulate`` to the ``tandem`` parser."""
    sim = sub.add_parser("sim", help="network simulator and trace-driven link emulator")
    commands = sim.add_subparsers(dest="sim_command", required=True)
    p = commands.add_parser("run", help="simulate a scenario's strategies and write a report")
    p.add_argument("scenario", type=Path, help="scenario YAML file (see sim/scenarios)")
    p.add_argument("--out", required=True, type=Path, help="directory for report.md and charts")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON document")
    p.set_defaults(func=cmd_run)
    p = commands.add_parser("sweep", help="run a scenario once per value of one parameter")
    p.add_argument("scenario", type=Path, help="scenario YAML file (see sim/scenarios)")
    p.add_argument(
        "--param",
        required=True,
        choices=("bandwidth", "devices", "bits", "width"),  # sim.sweep.PARAMS, kept light
        help="bandwidth: every uplink constant, Mbit/s; devices: every group's count; "
        "bits, width: the split point",
    )
    p.add_argument("--values", required=True, help="comma-separated values, e.g. 0.5,1,2,5")
    p.add_argument("--out", required=True, type=Path, help="directory for sweep.md and charts")
    p.add_argument("--json", action="store_true", help="print the sweep as one JSON document")
    p.set_defaults(func=cmd_sweep)
    p = commands.add_parser("emulate", help="a TCP proxy shaped by uplink/downlink traces")
    trace_help = "trace file (Mahimahi or 'time_s mbps'), or const:MBPS, steps:A,B@S, ..."
    p.add_argument("--uplink", required=True, help=trace_help)
    p.add_argument("--downlink", required=True, help=trace_help)
    p.add_argument("--delay-ms", type=float, default=0.0, help="one-way propagation delay")
    p.add_argument("--jitter-ms", type=float, default=0.0, help="sigma of |normal| extra delay")
    p.add_argument("--loss", type=float, default=0.0, help="packet loss probability, [0, 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the jitter and loss draws")
    p.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT (port 0: any free)")
    p.add_argument("--upstream", required=True, help="HOST:PORT of the server behind the link")
    p.add_argument("--json", action="store_true", help="print one JSON line once listening")
    p.set_defaults(func=cmd_emulate)


def _bar(args: argparse.Namespace, total: int, desc: str) -> tqdm[Any]:
    return progress_bar(total=total, desc=desc, show=not args.json)


def profile_bundle(args: argparse.Namespace, wiring: Wiring) -> int:
    """``tandem profile --bundle``: measure head, tail and full-model costs of a bundle on this
    machine (and, with ``--calibrate``, the daemon's overhead, the real service and daemon
    started by ``wiring``); write the simulator's JSON."""
    import tempfile

    from tandem.data import load_data
    from tandem.sim.profiles import measure_bundle
    from tandem.sim.scenario import SplitPoint
    from tandem.sim.validate import calibrate

    if args.data is None or args.out is None:
        raise ValueError("profiling a bundle needs --data and --out")
    x = load_data(args.data).test.x
    if len(x) < 64:
        raise ValueError(f"{args.data} has {len(x)} test inputs; profiling needs at least 64")
    profile = measure_bundle(args.bundle, x[:256])
    if args.calibrate:
        first = profile.table[0]
        point = SplitPoint(width=first.width, bits=first.bits, point=first.point)
        with tempfile.TemporaryDirectory(prefix="tandem-profile-") as tmp:
            profile = asyncio.run(calibrate(profile, args.bundle, x, point, Path(tmp), wiring))
    profile.save(args.out)
    if args.json:
        print(profile.model_dump_json())
    else:
        heads = ", ".join(f"{w:g}: {ms:.2f}" for w, ms in profile.head_ms.items())
        print(
            f"{profile.bundle} on {profile.machine}: head ms per input by width {{{heads}}}, "
            f"full model {profile.full_ms:.2f} ms, edge overhead "
            f"{profile.send_overhead_ms:.2f} ms per request; wrote {args.out}"
        )
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    """Simulate every strategy of a scenario; write the report; print its summary."""
    from tandem.sim.report import report_steps, speed_line, text_table, write_report
    from tandem.sim.scenario import open_scenario

    setup = open_scenario(args.scenario)
    with _bar(args, report_steps(setup), "simulating") as bar:
        doc = write_report(setup, args.out, progress=bar.update)
    if args.json:
        print(json.dumps(doc, allow_nan=False))
        return 0
    s = setup.scenario
    print(
        f"scenario {s.name}: {doc['devices']} devices, {s.duration_s:g} s simulated, "
        f"SLO {s.slo_ms:g} ms, profile {setup.profile.bundle} ({setup.profile.machine})\n"
        + text_table(doc["strategies"])
        + f"\n{speed_line(doc)}; wrote {args.out / 'report.md'}"
    )
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    """Run a scenario once per value of ``--param``; write the sweep; print its table."""
    from tandem.sim.scenario import load_scenario
    from tandem.sim.sweep import parse_values, run_sweep, sweep_text, write_sweep

    values = parse_values(args.param, args.values)
    scenario = load_scenario(args.scenario)
    with _bar(args, len(values) * len(scenario.strategies), "sweeping") as bar:
        doc = run_sweep(scenario, args.scenario.parent, args.param, values, bar.update)
    write_sweep(doc, args.out)
    if args.json:
        print(json.dumps(doc, allow_nan=False))
    else:
        print(sweep_text(doc) + f"\nwrote {args.out / 'sweep.md'}")
    return 0


def cmd_emulate(args: argparse.Namespace) -> int:
    """Relay until SIGTERM or SIGINT, then close every connection and return 0."""
    from tandem.address import format_address, parse_address
    from tandem.sim.emulator import LinkEmulator
    from tandem.sim.link import Link
    from tandem.sim.traces import parse_spec

    upstream, listen = parse_address(args.upstream), parse_address(args.listen)
    links = [
        Link(
            parse_spec(spec, (args.seed, i)),
            args.delay_ms / 1000,
            jitter_s=args.jitter_ms / 1000,
            loss=args.loss,
            seed=(args.seed, i),
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

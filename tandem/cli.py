"""The one ``tandem`` command, with a subcommand per job.

Every reporting subcommand takes ``--json`` and then prints exactly one JSON document on
stdout; progress bars go to stderr, only on a terminal, and never in ``--json`` mode. A
failure is one line on stderr and exit status 2; with ``--json`` it is also a JSON object
``{"error": ..., "type": ...}`` on stdout. Output into a closed pipe (``tandem ... | head``)
ends the command quietly with status 141, as a shell reports a writer stopped by SIGPIPE.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any, NoReturn, TextIO, cast

from tandem import __version__
from tandem.equal_accuracy import DEFAULT_WITHIN
from tandem.progress import bar as progress_bar

log = logging.getLogger("tandem")

#: The exit status of a command whose output went into a closed pipe: 128 + SIGPIPE, what a
#: shell reports for a writer the signal stopped (Python ignores SIGPIPE, so we say it).
BROKEN_PIPE_STATUS = 141


class CommandError(Exception):
    """A command failed for a reason its one-line message tells the user (no traceback)."""


class UsageError(Exception):
    """The command line does not parse; ``parser`` is the (sub)parser that refused it."""

    def __init__(self, parser: argparse.ArgumentParser, message: str) -> None:
        super().__init__(message)
        self.parser = parser


class Parser(argparse.ArgumentParser):
    """argparse, raising :class:`UsageError` instead of exiting, so that ``main`` can answer
    a ``--json`` caller in JSON (sub-parsers inherit the class)."""

    def error(self, message: str) -> NoReturn:
        """Raise :class:`UsageError` for ``message``."""
        raise UsageError(self, message)


class HelpFormatter(argparse.HelpFormatter):
    """argparse's help, each option's default appended as ``(default: X)`` when it has one
    worth showing: not None, not an off flag, not empty, and not already described
    in its help."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (
            not action.option_strings
            or "(default" in text
            or default is None
            or default is argparse.SUPPRESS
            or isinstance(default, bool)
            or default in ([], "")
        ):
            return text
        return f"{text} (default: %(default)s)"


def iter_parsers(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    """``parser`` and every sub-parser below it, each once."""
    seen: set[int] = set()
    stack = [parser]
    while stack:
        current = stack.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        for action in current._actions:
            if isinstance(action, argparse._SubParsersAction):
                stack.extend(action.choices.values())


# Errors of modules that need PyTorch, by module: caught only when their module was imported
# (one that was not cannot have raised them), so a device without PyTorch reports errors too.
_TORCH_SIDE_ERRORS = {
    "tandem.checkpoint": "CheckpointError",
    "tandem.models.registry": "UnknownModelError",
    "tandem.split": "SplitError",
}


def _known_errors() -> tuple[type[Exception], ...]:
    from pydantic import ValidationError

    from tandem.codec import CodecError
    from tandem.config import RecipeError
    from tandem.data import DataSpecError
    from tandem.manifest import BundleError

    torch_side = tuple(
        getattr(sys.modules[module], name)
        for module, name in _TORCH_SIDE_ERRORS.items()
        if module in sys.modules
    )
    # ValueError and TypeError cover bad arguments reaching the zoo and the runners.
    return (
        CommandError,
        ValidationError,
        BundleError,
        CodecError,
        RecipeError,
        DataSpecError,
        *torch_side,
        ValueError,
        TypeError,
        OSError,
    )


def _show_progress(args: argparse.Namespace) -> bool:
    return not args.json and sys.stderr.isatty()


@contextmanager
def _bar(
    args: argparse.Namespace, total: int | None, desc: str
) -> Iterator[Callable[[int], object]]:
    with progress_bar(total=total, desc=desc, show=_show_progress(args)) as bar:
        yield bar.update


def _emit(args: argparse.Namespace, doc: dict[str, Any], text: Callable[[], str]) -> None:
    print(json.dumps(doc, allow_nan=False) if args.json else text())


def _codec_name(point: dict[str, Any]) -> str:
    """A bottleneck point's codec as the tables name it: a rate point or a bit depth."""
    if point.get("codec", "quantize") == "entropy":
        return f"entropy β={point['beta']:g}"
    return f"{point['bits']}-bit+zstd"


def _points_table(points: list[dict[str, Any]], teacher_acc: float | None) -> str:
    lines = [
        f"{'width':>6} {'codec':>14} {'accuracy':>9} {'vs teacher':>10} {'bytes/sample':>13} "
        f"{'model bits':>10}"
    ]
    for p in points:
        delta = f"{100 * (p['accuracy'] - teacher_acc):+.2f} pp" if teacher_acc is not None else "-"
        bits = f"{p['entropy_bits']:.1f}" if p.get("codec") == "entropy" else "-"
        lines.append(
            f"{p['width']:>6.2f} {_codec_name(p):>14} {100 * p['accuracy']:>8.2f}% {delta:>10} "
            f"{p['bytes_per_sample']:>13.1f} {bits:>10}"
        )
    return "\n".join(lines)


def _eval_text(report: dict[str, Any]) -> str:
    teacher = report["teacher"]["accuracy"]
    base = report["baselines"]
    head = [
        f"bundle {report['bundle']} on {report['samples']} test samples",
        f"teacher accuracy {100 * teacher:.2f}%" if teacher is not None else "teacher: n/a",
        "input bytes/sample: raw {raw:.0f}, PNG {png:.1f}, zstd-19 {zstd19:.1f}, "
        "WebP lossless {webp_lossless:.1f}".format(**base),
        f"head FLOPs share {report['head_flops_share']:.4f}",
        "",
    ]
    return "\n".join(head) + _points_table(report["points"], teacher) + _inputs_table(report)


def _inputs_table(report: dict[str, Any]) -> str:
    """The teacher on inputs sent through JPEG, WebP and PNG, when it was measured."""
    rows = report.get("input_codecs") or []
    if not rows:
        return ""
    lines = ["", "", "sending the input instead (the teacher on the decoded image):",
             f"{'codec':<6} {'quality':>8} {'bytes':>8} {'accuracy':>9}"]  # fmt: skip
    for r in rows:
        quality = "lossless" if r["quality"] is None else str(r["quality"])
        lines.append(f"{r['codec']:<6} {quality:>8} {r['bytes_per_sample']:>8.1f} "
                     f"{100 * r['accuracy']:>8.2f}%")  # fmt: skip
    return "\n".join(lines) + "\n" + _equal_accuracy_text(report.get("equal_accuracy"))


def _point_name(point: dict[str, Any]) -> str:
    """One bottleneck or input-codec point as the tables name it."""
    if "quality" in point:
        quality = "lossless" if point["quality"] is None else f"q{point['quality']}"
        return f"{point['codec'].upper()} {quality}"
    return f"width {point['width']:g} {_codec_name(point)}"


def _equal_accuracy_text(compared: dict[str, Any] | None) -> str:
    """The line comparing both routes at equal accuracy, when the teacher was measured."""
    if compared is None:
        return ""
    cheapest = []
    for route in ("input", "bottleneck"):
        point = compared[route]
        cheapest.append(
            "none"
            if point is None
            else f"{_point_name(point)}, {point['bytes_per_sample']:.1f} B "
            f"({100 * point['accuracy']:.2f}%)"
        )
    ratio = compared["ratio"]
    return (
        f"\nwithin {100 * compared['within']:g} pp of the teacher: cheapest input {cheapest[0]}; "
        f"cheapest bottleneck {cheapest[1]}"
        + (f"; bottleneck/input bytes {ratio:.3f}" if ratio is not None else "")
        + "\n"
    )


def _train(
    args: argparse.Namespace, recipe_name: str, data_spec: str, out: Path, skip: bool = False
) -> Any:
    from tandem.api import train_recipe

    return train_recipe(
        recipe_name,
        data_spec,
        out=out,
        overrides=args.set,
        fresh=args.fresh,
        progress=_show_progress(args),
        workers=args.workers,
        device=args.device,
        skip_unreadable=skip,
    )


def cmd_train(args: argparse.Namespace) -> int:
    """``tandem train RECIPE --data SPEC --out DIR``: run a recipe and write a bundle."""
    manifest = _train(args, args.recipe, args.data, Path(args.out), args.skip_unreadable)
    # The keys of `tandem eval --json` for the same things: "teacher" and "points".
    doc: dict[str, Any] = {
        "bundle": str(args.out),
        "recipe": manifest.name,
        "teacher": {"accuracy": manifest.teacher_accuracy, "measured": True},
        "points": [p.model_dump() for p in manifest.table],
    }
    _emit(
        args,
        doc,
        lambda: f"wrote {args.out}\n" + _points_table(doc["points"], manifest.teacher_accuracy),
    )
    return 0


def _evaluate(
    args: argparse.Namespace,
    bundle: Path,
    data_spec: str,
    skip: bool = False,
    within: float = DEFAULT_WITHIN,
) -> dict[str, Any]:
    from tandem.bundle import FULL_FILE, read_manifest
    from tandem.data import load_data
    from tandem.device import resolve_device
    from tandem.evaluate import evaluate_bundle
    from tandem.input_codecs import count

    device = resolve_device(args.device)  # before anything is read: a wrong one fails at once
    manifest = read_manifest(bundle)
    test = load_data(data_spec, skip_unreadable=skip).test
    split = test.in_memory(args.workers)  # every point is measured over all of it
    bits = args.bits or manifest.recipe.get("eval_bits") or [16, 8, 4, 2]
    rates = len(manifest.entropy.betas) if manifest.entropy is not None else 0
    total = len(manifest.bottleneck.widths) * (len(bits) + rates)
    total += count() if FULL_FILE in manifest.files else 0
    with _bar(args, total, "evaluating") as on_point:
        return evaluate_bundle(bundle, split, bits, progress=on_point, device=device, within=within)


def cmd_eval(args: argparse.Namespace) -> int:
    """``tandem eval BUNDLE --data SPEC``: accuracy and bytes at every operating point, next
    to the lossless input codecs; ``--plot`` draws them."""
    report = _evaluate(
        args, Path(args.bundle), args.data, args.skip_unreadable, within=args.within / 100
    )
    if args.plot is not None:
        from tandem.sim.charts import plot_rate_accuracy

        plot_rate_accuracy(report, args.plot)
        report["plot"] = str(args.plot)
    _emit(args, report, lambda: _eval_text(report))
    return 0


def _parse_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(part) for part in text.lower().split("x"))
    except ValueError:
        shape = ()
    if not shape or any(d <= 0 for d in shape):
        raise argparse.ArgumentTypeError(f"expected a shape like 3x224x224, got {text!r}")
    return shape


def cmd_profile(args: argparse.Namespace) -> int:
    """``tandem profile --arch NAME --input CxHxW``: cost of every valid cut point; with
    ``--bundle``, a trained bundle's costs on this machine for the simulator."""
    from tandem.device import describe, resolve_device

    device = resolve_device(args.device)
    if (args.bundle is not None or args.out is not None) and device.type != "cpu":
        # A device class scales this machine's one CPU thread: a GPU timing would be wrong.
        raise ValueError(f"profiles for the simulator are timed on one CPU thread, not {device}: "
                         "leave --device out or give cpu")  # fmt: skip
    if args.bundle is not None:
        from tandem.sim.cli import profile_bundle

        return profile_bundle(args, Processes())
    if args.arch is None or args.input is None:
        raise ValueError("profile needs --arch and --input (or --bundle)")
    import torch

    from tandem.api import cut_points
    from tandem.config import parse_assignment
    from tandem.models import build_model
    from tandem.profile import model_latency_ms

    if args.out is not None:
        if args.repeats < 1:
            raise ValueError("an architecture profile for the simulator needs --repeats >= 1")
        torch.set_num_threads(1)
    kwargs = dict(parse_assignment(assignment, "--arg") for assignment in args.arg)
    model = build_model(
        args.arch, num_classes=args.num_classes, in_channels=args.input[0], **kwargs
    )
    model.to(device).eval()
    with _bar(args, None, "profiling") as tick:
        example = torch.zeros(1, *args.input)  # only its shape is read
        profiles = cut_points(
            model, example, repeats=args.repeats, cuts=args.cut or None, progress=lambda: tick(1)
        )
    doc = {
        "arch": args.arch,
        "input": list(args.input),
        "device": describe(device),
        "cuts": [p.to_dict() for p in profiles],
    }
    if args.out is not None:
        from tandem.sim.stated import arch_profile

        full_ms = model_latency_ms(model, args.input, args.repeats)
        saved = arch_profile(args.arch, list(args.input), args.num_classes, profiles, full_ms, 1)
        saved.save(args.out)
        doc.update(full_ms=full_ms, threads=1, out=str(args.out))
    _emit(args, doc, lambda: _profile_text(doc["cuts"]))
    return 0


def _profile_text(cuts: list[dict[str, Any]]) -> str:
    lines = [
        f"{'cut':<24} {'shape':<16} {'bytes':>9} {'head MFLOPs':>12} {'tail MFLOPs':>12} "
        f"{'head ms':>8}"
    ]
    for c in cuts:
        shape = "x".join(str(d) for d in c["shape"])
        ms = "-" if c["head_latency_ms"] is None else f"{c['head_latency_ms']:.2f}"
        lines.append(
            f"{c['name']:<24} {shape:<16} {c['raw_bytes']:>9} {c['head_flops'] / 1e6:>12.1f} "
            f"{c['tail_flops'] / 1e6:>12.1f} {ms:>8}"
        )
    return "\n".join(lines)


DEMO_RATE = ("rate.betas=[0.02, 0.1]", "rate.end_to_end=true")
"""The demo's two rate points: the table shows the entropy codec beside quantise+zstd, and
the daemon's policy chooses among both."""


def cmd_demo(args: argparse.Namespace) -> int:
    """``tandem demo``: train the digits recipe, evaluate it, serve it edge -> cloud, then
    over an emulated LTE link, and simulate every strategy on that link."""
    args.set, args.fresh, args.bits = list(DEMO_RATE), True, None
    args.workers, args.device = None, "cpu"  # the digits are small: the CPU serves them best
    with tempfile.TemporaryDirectory(prefix="tandem-demo-") as tmp:
        out = Path(args.out) if args.out else Path(tmp) / "digits"
        if not args.json:
            print(
                f"training the 'digits' recipe on the bundled 8x8 digits into {out}, with a "
                f"learned entropy model ({' '.join(DEMO_RATE)}) ..."
            )
        start = time.perf_counter()
        _train(args, "digits", "digits", out)
        train_s = time.perf_counter() - start
        report = _evaluate(args, out, "digits")
        if not args.json:
            print(f"trained in {train_s:.0f} s\n" + _eval_text(report) + "\n")
            print("serving the digits test split: edge daemon -> gRPC on loopback -> cloud ...")
        served = asyncio.run(_serve_demo(out, Path(tmp)))
        if not args.json:
            print(_served_text(served) + "\n")
            print("the same over an emulated LTE link, then simulating every strategy ...")
        simulated = _sim_demo(out, Path(args.report), Path(tmp))
    doc = {
        "train_seconds": round(train_s, 1), "eval": report, "served": served,
        "simulated": simulated,
    }  # fmt: skip
    _emit(args, doc, lambda: _sim_text(simulated))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """``tandem export BUNDLE --onnx``: the head as ONNX files inside the bundle."""
    from tandem.onnx_export import export_onnx

    index = export_onnx(args.bundle)
    doc = {"bundle": str(args.bundle), **index}
    _emit(args, doc, lambda: _export_text(args.bundle, index))
    return 0


def _export_text(bundle: Path, index: dict[str, Any]) -> str:
    lines = [f"ONNX head of {bundle} (version {index['bundle_version']}), {index['exporter']}:"]
    for width, head in index["heads"].items():
        lines.append(
            f"  width {width}: onnx/{head['file']}, {head['bytes']:,} bytes, largest "
            f"difference from PyTorch {head['max_abs_diff']:.2g}"
        )
    return "\n".join(lines)


def _sim_demo(bundle: Path, report: Path, tmp: Path) -> dict[str, Any]:
    from tandem.data import load_data
    from tandem.sim import demo

    return demo.run(bundle, load_data("digits").test.x, report, tmp / "sim", Processes())


def _sim_text(doc: dict[str, Any]) -> str:
    from tandem.sim.report import text_table

    return (
        f"link: {doc['link']}\n"
        f"edge daemon through the emulator: p50 {doc['emulated_p50_ms']:.1f} ms, "
        f"p95 {doc['emulated_p95_ms']:.1f} ms; the simulator predicted "
        f"{doc['simulated_p50_ms']:.1f} / {doc['simulated_p95_ms']:.1f} ms\n"
        f"{text_table(doc['strategies'])}\n"
        f"report with charts: {doc['report']}"
    )


async def _serve_demo(bundle: Path, tmp: Path) -> dict[str, Any]:
    """A cloud service on 127.0.0.1, and the edge daemon sending it the digits test split."""
    from tandem.bundle import copy_bundle
    from tandem.data import load_data

    test = load_data("digits").test
    source, sink = tmp / "digits-test.jsonl", tmp / "results.jsonl"
    source.write_text(
        "".join(
            json.dumps({"input": x.tolist(), "label": int(y)}) + "\n"
            for x, y in zip(test.x, test.y, strict=True)
        )
    )
    copy_bundle(bundle, tmp / "repo", "digits")
    wiring = Processes()
    # No local fallback: on loopback the tiny model would always win locally, and the demo
    # is about the split path.
    flags = ("--source", f"jsonl:{source}", "--sink", str(sink), "--slo-ms", "50", "--no-fallback")
    async with (
        wiring.service(tmp / "repo") as address,
        wiring.daemon(bundle, address, *flags) as proc,
    ):
        out, _ = await proc.communicate()
    if proc.returncode != 0:
        raise CommandError(f"the demo's edge daemon exited with status {proc.returncode}")
    summary = json.loads(out.decode().strip().splitlines()[-1])
    records = [json.loads(line) for line in sink.read_text().splitlines()]
    points = sorted(
        {_point_words(r["width"], r["bits"], r["point"]) for r in records if r.get("width")}
    )
    return {**summary, "server": address, "operating_points": points}


class Processes:
    """The one place where the roles are put together: the cloud service and the edge daemon,
    each started as a ``tandem`` process of its own (one torch thread each, as a small
    device and a pinned service run), for the demo, the simulator's validation and
    ``tandem profile --calibrate`` (:class:`tandem.sim.validate.Wiring`)."""

    command = (sys.executable, "-m", "tandem.cli")
    start_s = 120.0
    """How long a process may take to start (to print its address)."""

    @asynccontextmanager
    async def service(self, repo: Path, *flags: str) -> AsyncIterator[str]:
        """``tandem cloud serve`` over ``repo`` on a free loopback port, metrics off, with
        ``flags``; yields its address, drains it on exit."""
        async with self._child(
            "cloud", "serve", "--json", "--models", str(repo), "--listen", "127.0.0.1:0",
            "--metrics-listen", "off", *flags, ready=True,
        ) as (_, line):  # fmt: skip
            yield str(json.loads(line)["address"])

    @asynccontextmanager
    async def daemon(
        self, bundle: Path, cloud: str, *flags: str, stdin: bool = False
    ) -> AsyncIterator[asyncio.subprocess.Process]:
        """``tandem edge run --json`` of ``bundle`` against ``cloud`` with ``flags``; its
        stdout is a pipe (the summary), and so is its stdin with ``stdin``."""
        async with self._child(
            "edge", "run", "--json", "--bundle", str(bundle), "--cloud", cloud, *flags,
            stdin=stdin,
        ) as (proc, _):  # fmt: skip
            yield proc

    @asynccontextmanager
    async def _child(
        self, *argv: str, stdin: bool = False, ready: bool = False
    ) -> AsyncIterator[tuple[asyncio.subprocess.Process, str]]:
        """A ``tandem`` child process, and with ``ready`` its first stdout line (waited for
        up to :attr:`start_s`); terminated on exit if still running, also when it fails
        to start."""
        proc = await asyncio.create_subprocess_exec(
            *self.command, *argv,
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )  # fmt: skip
        try:
            line = ""
            if ready:
                assert proc.stdout is not None
                line = (await asyncio.wait_for(proc.stdout.readline(), self.start_s)).decode()
                if not line:
                    raise CommandError(f"tandem {' '.join(argv[:2])} did not start")
            yield proc, line
        finally:
            if proc.returncode is None:
                proc.terminate()
            await proc.wait()


def _point_words(width: float, bits: int | None, point: int | None) -> str:
    """An operating point the daemon sent at, in words."""
    return (
        f"width {width} at {bits} bits"
        if bits is not None
        else f"width {width} at rate point {point}"
    )


def _served_text(served: dict[str, Any]) -> str:
    from tandem.edge.cli import summary_text

    points = ", ".join(served["operating_points"])
    return f"served via {served['server']} ({points})\n" + summary_text(served)


VERBOSE_HELP = "log progress to stderr"


def _workers(text: str) -> int | None:
    """``--workers``: ``auto`` (None) or a count of reader processes."""
    if text == "auto":
        return None
    try:
        count = int(text)
    except ValueError:
        count = -1
    if count < 0:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a count >= 0, got {text!r}")
    return count


def _non_negative(text: str) -> float:
    """A number >= 0 (``--within``)."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:  # NaN too
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


DEVICE_OPTION_HELP = (
    "where to compute: auto (CUDA when PyTorch sees one, else the CPU), cpu, cuda or cuda:N"
)


def device_option(p: argparse.ArgumentParser, help: str = DEVICE_OPTION_HELP) -> None:
    """``--device`` (default auto), for the commands that compute with a model."""
    p.add_argument("--device", default="auto", help=help)


def _reading_options(p: argparse.ArgumentParser) -> None:
    """``--skip-unreadable`` and ``--workers``, for the commands that read a user's data."""
    p.add_argument(
        "--skip-unreadable", action="store_true",
        help="leave out images of an image folder that cannot be decoded (counted in one "
        "warning) instead of stopping at the first",
    )  # fmt: skip
    p.add_argument(
        "--workers", type=_workers, default="auto", metavar="N",
        help="reader processes that decode an image folder's files as they are needed (auto: "
        "tandem.data.DEFAULT_WORKERS for an image folder, none for arrays in memory)",
    )  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for ``tandem`` and its subcommands (the roles' included).

    Every parser shows option defaults (:class:`HelpFormatter`) and takes ``-v`` before or
    after its subcommand.
    """
    parser = Parser(prog="tandem", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"tandem {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help=VERBOSE_HELP)
    # The roles' register() take argparse's own type; Parser only changes how errors leave.
    sub = cast(
        "argparse._SubParsersAction[argparse.ArgumentParser]",
        parser.add_subparsers(dest="command", required=True, metavar="COMMAND"),
    )

    p = sub.add_parser("train", help="run a distillation recipe and write a bundle")
    p.add_argument("recipe", help="built-in recipe name (digits, mnist, cifar10) or a TOML file")
    p.add_argument("--data", required=True, help="digits | npz:PATH | imagefolder:DIR")
    _reading_options(p)
    p.add_argument("--out", required=True, help="bundle directory (also holds checkpoints)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe key, VALUE a TOML literal or plain text, e.g. "
        "--set distill.finetune.epochs=2 --set name=my-digits (repeatable)",
    )
    p.add_argument("--fresh", action="store_true", help="ignore existing checkpoints in --out")
    device_option(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="measure a bundle's accuracy against bytes per sample")
    p.add_argument("bundle", help="the bundle directory")
    p.add_argument("--data", required=True, help="digits | npz:PATH | imagefolder:DIR")
    _reading_options(p)
    p.add_argument(
        "--bits",
        type=int,
        nargs="+",
        help="quantise+zstd bit depths to measure, next to every rate point (default: the "
        "recipe's)",
    )
    p.add_argument(
        "--plot",
        type=Path,
        metavar="FILE.png",
        help="also draw accuracy against bytes per sample to this PNG (needs tandem[sim])",
    )
    p.add_argument(
        "--within",
        type=_non_negative,
        default=100 * DEFAULT_WITHIN,
        metavar="PP",
        help="compare the cheapest bottleneck and input-codec points within this many "
        "percentage points of the teacher's accuracy",
    )
    device_option(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser(
        "profile",
        help="FLOPs, params, bytes and latency at every cut point; or, with --bundle, a "
        "bundle's measured costs for the simulator",
    )
    p.add_argument("--arch", help="zoo model name")
    p.add_argument("--input", type=_parse_shape, help="CxHxW, e.g. 3x224x224")
    p.add_argument("--num-classes", type=int, default=1000, help="the model's output classes")
    p.add_argument(
        "--arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="model constructor argument, as --set reads it, e.g. --arg width=0.5 "
        "--arg small_input=true (repeatable)",
    )
    p.add_argument(
        "--cut",
        action="append",
        default=[],
        metavar="NAME",
        help="profile only this cut point, e.g. --cut layer2 (repeatable; default: every one)",
    )
    p.add_argument(
        "--repeats", type=int, default=5, help="timed runs per cut, median reported (0: no timing)"
    )
    p.add_argument("--bundle", type=Path, help="profile this bundle for the simulator instead")
    p.add_argument("--data", help="with --bundle: inputs for it, e.g. digits, npz:PATH")
    p.add_argument(
        "--out", type=Path,
        help="the profile JSON to write for the simulator: with --arch, an architecture "
        "profile timed on one thread (scenarios state its rates: tandem.sim.stated); with "
        "--bundle, the bundle's",
    )  # fmt: skip
    p.add_argument(
        "--calibrate",
        action="store_true",
        help="with --bundle: also measure the edge daemon's per-request overhead (runs the real "
        "daemon and service over loopback for a few seconds)",
    )
    device_option(p)
    p.set_defaults(func=cmd_profile)

    p = sub.add_parser(
        "export",
        help="write a bundle's head in another format, for devices without PyTorch",
    )
    p.add_argument("bundle", type=Path, help="the bundle directory")
    p.add_argument(
        "--onnx", action="store_true", required=True,
        help="the head (encoder to the bottleneck) as ONNX, one file per width, into "
        "BUNDLE/onnx/ (`tandem edge run --runtime onnx` runs it)",
    )  # fmt: skip
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("demo", help="train, serve and simulate on the bundled digits data")
    p.add_argument("--out", help="keep the bundle here (default: a temporary directory)")
    p.add_argument(
        "--report", default="tandem-demo-report", help="directory for the simulation report"
    )
    p.set_defaults(func=cmd_demo)

    for action in sub.choices.values():
        action.add_argument("--json", action="store_true", help="print one JSON document")
    # The roles register their own subcommands (each adds its own --json).
    from tandem.cloud.cli import register as register_cloud
    from tandem.edge.cli import register as register_edge
    from tandem.federated.cli import register as register_fed
    from tandem.sim.cli import register as register_sim

    register_cloud(sub)
    register_edge(sub)
    register_sim(sub)
    register_fed(sub)
    for each in iter_parsers(parser):
        each.formatter_class = HelpFormatter
        if each is not parser:
            # SUPPRESS: a sub-parser that did not see -v leaves the top level's value alone.
            each.add_argument(
                "-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                help=f"{VERBOSE_HELP} (also accepted before the subcommand)",
            )  # fmt: skip
    return parser


# The third-party modules each extra brings, so a missing one names the extra to install.
EXTRA_OF_MODULE = {
    "torch": "train",
    "onnx": "train",
    "onnxscript": "train",
    "onnxruntime": "edge",
    "grpc_health": "cloud",
    "grpc_reflection": "cloud",
    "prometheus_client": "cloud",
    "matplotlib": "sim",
    "yaml": "sim",
    "flwr": "fed",
    "flwr_datasets": "fed",
    "peft": "fed",
    "datasets": "fed",
}


# PyTorch comes with several extras: the one to name is the command's own.
EXTRA_OF_COMMAND = {"cloud": "cloud", "fed": "fed", "sim": "sim"}


def missing_extra(exc: ModuleNotFoundError, command: str = "") -> str | None:
    """The one-line hint for a module that an uninstalled extra would bring, else None;
    ``command`` (the subcommand run) picks the extra that brings PyTorch for it."""
    top = (exc.name or "").partition(".")[0]
    extra = EXTRA_OF_MODULE.get(top)
    if extra is None:
        return None
    if top == "torch":
        extra = EXTRA_OF_COMMAND.get(command, extra)
    hint = (
        f"this command needs the '{extra}' extra (no module {top!r}): pip install 'tandem[{extra}]'"
    )
    if top == "torch" and command == "edge":
        hint += ", or run the head exported to ONNX with --runtime onnx"
    return hint


def error_line(exc: BaseException) -> str:
    """The one line a user is shown for ``exc``: a pydantic validation error, raised or the
    cause of the error raised, as its problems rather than pydantic's dump; any other message
    with its line breaks folded."""
    from pydantic import ValidationError

    from tandem.config import problems

    if isinstance(exc, ValidationError):
        return f"invalid {exc.title}: {problems(exc)}"
    text = str(exc)
    if isinstance(exc.__cause__, ValidationError) and "\n" in text.strip():
        # A message that embeds pydantic's dump: its first line, then the problems in one.
        text = f"{text.partition(chr(10))[0].rstrip(': ')}: {problems(exc.__cause__)}"
    return " ".join(text.split())


def _fail(
    json_mode: bool, kind: str, message: str, status: int = 2, documents: TextIO | None = None
) -> int:
    """Report a failure: one line on stderr and, for a ``--json`` caller, a JSON object on
    ``documents`` (stdout unless the command's results go there)."""
    print(f"tandem: error: {message}", file=sys.stderr)
    if json_mode:
        print(
            json.dumps({"error": message, "type": kind}), file=documents or sys.stdout, flush=True
        )
    return status


def _documents(args: argparse.Namespace) -> TextIO:
    """Where a command's JSON document goes: stdout, or stderr when the command writes its
    results to stdout (``edge run`` with the stdout sink), so no stray line joins them."""
    taken = getattr(args, "stdout_taken", None)
    return sys.stderr if taken is not None and taken(args) else sys.stdout


def _run(args: argparse.Namespace) -> int:
    try:
        return int(args.func(args))
    except BrokenPipeError:  # an OSError, but not a failure of the command: see main
        raise
    except _known_errors() as exc:
        if args.verbose:
            raise
        return _fail(args.json, type(exc).__name__, error_line(exc), documents=_documents(args))
    except ModuleNotFoundError as exc:
        hint = missing_extra(exc, args.command)
        if hint is None or args.verbose:
            raise
        return _fail(args.json, type(exc).__name__, hint, documents=_documents(args))
    except KeyboardInterrupt:
        note = " (run it again to resume from the last epoch)" if args.command == "train" else ""
        return _fail(args.json, "KeyboardInterrupt", f"interrupted{note}", 130, _documents(args))
    except Exception as exc:
        # A bug: its traceback follows, but a --json caller still gets a document to read.
        if args.json:
            doc = {"error": error_line(exc), "type": type(exc).__name__}
            print(json.dumps(doc), file=_documents(args), flush=True)
        raise


def _parse(argv: Sequence[str]) -> argparse.Namespace | int:
    """The parsed arguments, or the exit status of a usage error (reported here)."""
    try:
        args = build_parser().parse_args(argv)
    except UsageError as exc:
        exc.parser.print_usage(sys.stderr)
        return _fail("--json" in argv, "UsageError", f"{exc.parser.prog}: {exc}")
    args.json = getattr(args, "json", False)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``tandem`` console script; returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = _parse(argv)
        if isinstance(args, int):
            return args
        logging.basicConfig(
            level=logging.INFO if args.verbose else logging.WARNING,
            format="%(levelname)s %(name)s: %(message)s",
        )
        status = _run(args)
        sys.stdout.flush()  # here, where a closed pipe can still be handled
        return status
    except BrokenPipeError:
        # The reader went away (`tandem ... | head`): nothing more to say. Whatever is still
        # buffered goes to /dev/null, or the interpreter's last flush would fail loudly.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return BROKEN_PIPE_STATUS


if __name__ == "__main__":
    # `python -m tandem.cli` runs this file as __main__, a second copy of the module: run the
    # one other modules import, so that exceptions they raise (CommandError) are its classes.
    from tandem.cli import main as canonical_main

    sys.exit(canonical_main())

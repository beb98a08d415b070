"""Flower's simulation runtime, on this machine: what ``tandem fed simulate`` runs.

Flower deprecates ``flwr.simulation.run_simulation``; its supported way to simulate a
federation is a SuperLink started with ``--simulation`` and the app submitted with ``flwr
run``. :func:`run_federation` does exactly that, in a private temporary directory:

- a Flower app directory whose ``pyproject.toml`` names this package's ServerApp and
  ClientApp and declares every run-config key with :class:`~federated.config.FedConfig`'s
  defaults (an installed wheel has no ``pyproject.toml`` of ours to point ``flwr run`` at);
- a SuperLink on a free port of 127.0.0.1, runtime dependency installation off (the apps use
  this environment's packages), stopped with its whole process group when the run ends or
  fails;
- Ray's session directory (``RAY_TMPDIR``) inside the temporary directory, so that nothing
  is left under ``/tmp/ray``.

``flwr run --stream`` prints the run's log; each line is passed on once to the
``tandem.federated.flower`` logger at its own level, without colour codes.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tandem import __version__
from tandem.cli import CommandError
from tandem.federated.config import FedConfig
from tandem.progress import beat

log = logging.getLogger("tandem.federated.flower")

BIN = Path(sys.executable).parent
CONNECTION = "tandem-local"
READY_TIMEOUT_S = 60.0
STOP_GRACE_S = 15.0
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
LEVEL = re.compile(r"^(DEBUG|INFO|WARNING|ERROR|CRITICAL)\s*:\s?(.*)$")
# Flower warns that its default federation size changed; the runs here always set the size.
MOOT_WARNINGS = ("default simulated SuperNodes changed",)


def toml_value(value: Any) -> str:
    """A FedConfig value (bool, int, float or str) as a TOML literal."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    # A JSON string is a TOML basic string: the same escapes, double quotes.
    import json

    return json.dumps(str(value))


def toml_table(values: Mapping[str, Any]) -> str:
    """``key = value`` lines for a flat mapping (keys as given)."""
    return "".join(f"{key} = {toml_value(value)}\n" for key, value in values.items())


def run_config(cfg: FedConfig) -> dict[str, Any]:
    """``cfg`` as Flower's flat run config: dashed keys, every setting."""
    return {key.replace("_", "-"): value for key, value in cfg.model_dump().items()}


def app_pyproject() -> str:
    """The ``pyproject.toml`` of the Flower app that ``flwr run`` submits."""
    defaults = {
        name.replace("_", "-"): "" if field.is_required() else field.default
        for name, field in FedConfig.model_fields.items()
    }
    return (
        '[project]\nname = "tandem-fed"\n'
        f"version = {toml_value(__version__)}\n"
        'description = "tandem federated LoRA fine-tuning"\nlicense = "Apache-2.0"\n'
        "dependencies = []\n\n"
        '[tool.flwr.app]\npublisher = "tandem"\n\n'
        "[tool.flwr.app.components]\n"
        'serverapp = "tandem.federated.server_app:app"\n'
        'clientapp = "tandem.federated.client_app:app"\n\n'
        "[tool.flwr.app.config]\n" + toml_table(defaults)
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stop_group(proc: subprocess.Popen[bytes], grace_s: float = STOP_GRACE_S) -> None:
    """SIGTERM the process group of ``proc`` (started with ``start_new_session``), SIGKILL what
    is left after ``grace_s``."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(grace_s)


def wait_listening(port: int, proc: subprocess.Popen[bytes], logfile: Path) -> None:
    """Return once something listens on 127.0.0.1:``port``; CommandError, with the tail of
    ``logfile``, if ``proc`` exits first or nothing listens within the start-up bound."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = " | ".join(logfile.read_text(errors="replace").splitlines()[-3:])
            raise CommandError(f"the local SuperLink exited {proc.returncode}: {tail}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise CommandError(f"the local SuperLink did not listen within {READY_TIMEOUT_S:.0f} s")


@contextmanager
def local_superlink(root: Path, env: dict[str, str]) -> Iterator[subprocess.Popen[bytes]]:
    """A SuperLink in simulation mode on 127.0.0.1, for the connection :data:`CONNECTION`
    written to ``env``'s FLWR_HOME; yields its process, stopped with its children on exit."""
    port = free_port()
    (Path(env["FLWR_HOME"]) / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
        f'address = "127.0.0.1:{port}"\ninsecure = true\n'
    )
    args = [
        str(BIN / "flower-superlink"), "--insecure", "--simulation",
        "--disable-runtime-dependency-installation", "--host", "127.0.0.1", "--port", str(port),
        "--database", str(root / "superlink.db"),
    ]  # fmt: skip
    logfile = root / "superlink.log"
    with open(logfile, "wb") as out:
        # Its own process group: the SuperExec and simulation processes it starts go with it.
        proc = subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip
    try:
        wait_listening(port, proc, logfile)
        yield proc
    finally:
        stop_group(proc)


def forward(line: str) -> str:
    """One line of Flower's output to our log, once, at its level, without colour codes;
    returns the message as logged ("" for an empty line)."""
    text = ANSI.sub("", line).strip()
    match = LEVEL.match(text)
    level, message = (logging.INFO, text) if match is None else (
        logging.getLevelNamesMapping()[match.group(1)], match.group(2).strip()
    )  # fmt: skip
    if any(moot in message for moot in MOOT_WARNINGS):
        level = logging.INFO
    if message:
        log.log(level, "%s", message)
    return message


def flower_env(root: Path) -> dict[str, str]:
    """The environment of Flower's processes: a private FLWR_HOME and Ray temp directory, no
    telemetry or update check, this interpreter's scripts first on PATH."""
    home, ray = root / "flwr-home", root / "ray"
    home.mkdir()
    ray.mkdir()
    return {
        **os.environ,
        "FLWR_HOME": str(home),
        "RAY_TMPDIR": str(ray),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        # Ray's future default, which also silences its warning about the current one.
        "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    }


def run_federation(cfg: FedConfig, clients: int) -> None:
    """Run the federation ``cfg`` describes with ``clients`` simulated nodes; returns when
    the run has ended (its result, if any, is in ``cfg.out``). CommandError if Flower's
    command fails."""
    cpus = os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="tandem-fed-", ignore_cleanup_errors=True) as tmp:
        root = Path(tmp)
        env = flower_env(root)
        app = root / "tandem-fed"
        app.mkdir()
        (app / "pyproject.toml").write_text(app_pyproject())
        (root / "run.toml").write_text(toml_table(run_config(cfg)))
        federation = (
            f"num-supernodes={clients} client-resources-num-cpus=1 init-args-num-cpus={cpus}"
        )
        command = [
            str(BIN / "flwr"), "run", str(app), CONNECTION, "--run-config", str(root / "run.toml"),
            "--federation-config", federation, "--stream",
        ]  # fmt: skip
        with local_superlink(root, env):
            run = subprocess.Popen(
                command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                errors="replace",
            )  # fmt: skip
            assert run.stdout is not None
            try:
                for line in run.stdout:
                    message = forward(line)
                    if message:
                        beat(f"fed simulate: {message}")
            finally:
                _stop_run(run)
        if run.returncode != 0:
            raise CommandError(f"flwr run exited {run.returncode}; run with -v for its log")


def _stop_run(run: subprocess.Popen[str]) -> None:
    if run.poll() is None:
        run.terminate()
    run.wait(STOP_GRACE_S)

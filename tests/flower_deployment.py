"""Real Flower processes on loopback for tests: a SuperLink with N SuperNodes, or a SuperLink
running the simulation runtime; `flwr run` submits to either.

Each is its own process (and process group, so its SuperExec children go with it). Runtime
dependency installation stays off: the processes use this environment's packages. Ports are
chosen free on 127.0.0.1 just before use; Flower's binaries take no port 0.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from tandem.federated.runtime import (
    CONNECTION,
    free_port,
    local_superlink,
    stop_group,
    wait_listening,
)

BIN = Path(sys.executable).parent


def flower_env(home: Path) -> dict[str, str]:
    """The environment for Flower's commands: its own FLWR_HOME, no telemetry, our venv."""
    return {
        **os.environ,
        "FLWR_HOME": str(home),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    }


@contextmanager
def _process(args: list[str], env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with open(log, "wb") as out:
        proc = subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip
    try:
        yield proc
    finally:
        stop_group(proc)


def _connection(home: Path, port: int) -> None:
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "test"\n\n[superlink.test]\n'
        f'address = "127.0.0.1:{port}"\ninsecure = true\n'
    )


@contextmanager
def simulation_link(root: Path) -> Iterator[tuple[str, dict[str, str], list[int]]]:
    """The runtime's own local SuperLink (simulation, Ray); yields (connection, env, pids)."""
    home = root / "flwr-home"
    home.mkdir(parents=True)
    env = flower_env(home)
    with local_superlink(root, env) as link:
        yield CONNECTION, env, [link.pid]


@contextmanager
def deployment(root: Path, nodes: int) -> Iterator[tuple[str, dict[str, str], list[int]]]:
    """A SuperLink and ``nodes`` SuperNodes; yields (connection name, env, process ids)."""
    home = root / "flwr-home"
    home.mkdir(parents=True)
    env = flower_env(home)
    link_port = free_port()
    _connection(home, link_port)
    with ExitStack() as stack:
        log = root / "superlink.log"
        link_args = [
            str(BIN / "flower-superlink"), "--insecure",
            "--disable-runtime-dependency-installation",
            "--host", "127.0.0.1", "--port", str(link_port), "--database", str(root / "link.db"),
        ]  # fmt: skip
        link = stack.enter_context(_process(link_args, env, log))
        wait_listening(link_port, link, log)
        pids = [link.pid]
        for i in range(nodes):
            node_args = [
                str(BIN / "flower-supernode"), "--insecure",
                "--superlink", f"127.0.0.1:{link_port}", "--host", "127.0.0.1",
                "--port", str(free_port()),
                "--node-config", f"partition-id={i} num-partitions={nodes}",
            ]  # fmt: skip
            node = stack.enter_context(_process(node_args, env, root / f"supernode{i}.log"))
            pids.append(node.pid)
        yield "test", env, pids

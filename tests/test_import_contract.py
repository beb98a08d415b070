"""The import contract (tests/import_contract.py, run by make lint): the repository keeps it,
and each kind of breach is caught."""

from __future__ import annotations

from pathlib import Path

import pytest
from import_contract import breaches
from serving import ROOT


def test_the_repository_keeps_the_import_contract() -> None:
    assert breaches(ROOT) == []


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for name in ("tandem/__init__.py", "edge/__init__.py", "sim/__init__.py", "cloud/x.py"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).touch()
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    return tmp_path


@pytest.mark.parametrize(
    ("name", "text", "breach"),
    [
        (
            "sim/a.py",
            "from tandem.edge.daemon import EdgeDaemon\n",
            "sim imports tandem.edge.daemon",
        ),
        (
            "sim/a.py",
            "def f():\n    import tandem.cloud.server\n",
            "sim imports tandem.cloud.server",
        ),
        ("sim/a.py", "from ..edge import daemon\n", "sim imports tandem.edge"),
        ("sim/a.py", "from tandem import edge\n", "sim imports tandem.edge"),
        (
            "sim/a.py",
            "import importlib\nimportlib.import_module('tandem.cloud.x')\n",
            "sim imports tandem.cloud.x",
        ),
        ("tandem/bundle.py", "from tandem.edge import daemon\n", "tandem imports tandem.edge"),
        ("tandem/models/m.py", "from ..sim import des\n", "tandem imports tandem.sim"),
        (
            "sim/a.py",
            "import subprocess\nsubprocess.run(['python', '-m', 'tandem.cli', 'cloud', 'serve'])\n",
            "sim starts tandem cloud serve",
        ),
        (
            "sim/b.py",
            "x = ('edge', 'run', '--bundle')\n",
            "sim starts tandem edge run",
        ),
        ("tandem/evaluate.py", "server = CloudServer(cfg)\n", "tandem starts CloudServer"),
        ("cloud/x.py", "d = EdgeDaemon(cfg)\n", "cloud starts EdgeDaemon"),
    ],
)
def test_each_kind_of_breach_is_caught(tmp_path: Path, name: str, text: str, breach: str) -> None:
    found = breaches(_tree(tmp_path, {name: text}))
    assert len(found) == 1 and found[0].startswith(f"{name}:") and found[0].endswith(breach)


def test_what_the_contract_allows_passes(tmp_path: Path) -> None:
    allowed = {
        "tandem/cli.py": "from tandem.edge.daemon import EdgeDaemon\nfrom tandem.sim import des\n"
        "CloudServer(c)\nEdgeDaemon(d)\nargs = ('cloud', 'serve')\n",
        "edge/daemon.py": "from tandem.edge.spool import S\nfrom . import spool\n",
        "sim/des.py": "from tandem.protocol import bare_message\nimport tandem.sim.link\n",
        "cloud/server.py": "server = CloudServer(cfg)\nargv = ['cloud', 'serve']\n",
    }
    assert breaches(_tree(tmp_path, allowed)) == []

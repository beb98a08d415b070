"""The import contract between Tandem's roles, checked from the source (``make lint``).

The roles are the top-level packages ``edge``, ``cloud``, ``federated`` and ``sim``, installed
as ``tandem.edge`` and so on. The rules:

1. A role imports no other role: shared logic lives in ``tandem/``.
2. ``tandem/`` (the shared core) imports no role, except :data:`WIRING`, the command line,
   the one place where roles are put together.
3. Only :data:`WIRING` starts a role outside its own package: no other module calls
   :data:`ROLE_ENTRIES` (``CloudServer(...)``, ``EdgeDaemon(...)``) outside the role that
   defines it, or spells a role's command (``"cloud", "serve"``, ``"edge", "run"``) as
   arguments of its own.

Every import counts: module-level or inside a function, absolute or relative, and
``importlib.import_module`` with a constant name. ``python tests/import_contract.py [ROOT]``
prints each breach as ``FILE:LINE: WHO imports MODULE`` and exits 1 when there is one.
"""

from __future__ import annotations

import ast
import itertools
import sys
from collections.abc import Iterator
from pathlib import Path

ROLES = ("edge", "cloud", "federated", "sim")
CORE = "tandem"
WIRING = {"tandem/cli.py"}
GENERATED = ("tandem/wire/",)  # protobuf stubs: they import only protobuf and grpc
ROLE_ENTRIES = {"CloudServer": "cloud", "EdgeDaemon": "edge"}
ROLE_COMMANDS = {("cloud", "serve"), ("edge", "run")}


def owner(path: Path, root: Path) -> str:
    """The package a source file belongs to: a role's name, or ``tandem`` for the core."""
    top = path.relative_to(root).parts[0]
    return top if top in ROLES else CORE


def imported(tree: ast.AST, package: str) -> Iterator[tuple[int, str]]:
    """(line, absolute module name) of every import in ``tree``, for a file in ``package``
    (dotted, e.g. ``tandem.edge``; relative imports resolve against it)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join([*base, *([node.module] if node.module else [])])
            else:
                module = node.module or ""
            yield node.lineno, module
            for alias in node.names:  # `from tandem import edge` imports a role too
                yield node.lineno, f"{module}.{alias.name}"
        elif _is_import_module(node):
            assert isinstance(node, ast.Call)
            arg = node.args[0]
            assert isinstance(arg, ast.Constant)
            yield node.lineno, str(arg.value)


def _is_import_module(node: ast.AST) -> bool:
    return (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute | ast.Name)
        and (node.func.attr if isinstance(node.func, ast.Attribute) else node.func.id)
        == "import_module"
        and bool(node.args)
        and isinstance(node.args[0], ast.Constant)
        and isinstance(node.args[0].value, str)
    )


def role_of(module: str) -> str | None:
    """The role an imported module name belongs to, if any."""
    parts = module.split(".")
    if parts[0] == CORE and len(parts) > 1 and parts[1] in ROLES:
        return parts[1]
    return parts[0] if parts[0] in ROLES else None


def breaches(root: Path) -> list[str]:
    """Every import under ``root`` that breaks the contract, as ``FILE:LINE: ...`` lines."""
    found: dict[tuple[str, int], str] = {}  # one line per import statement
    for path in _sources(root):
        rel = path.relative_to(root).as_posix()
        who = owner(path, root)
        package = ".".join([CORE, *path.relative_to(root).parts[:-1]])
        if who == CORE:
            package = ".".join(path.relative_to(root).parts[:-1])
        tree = ast.parse(path.read_text(), filename=rel)
        if rel not in WIRING:
            for line, what in started(tree, who):
                found[(rel, line)] = what
        for line, module in imported(tree, package):
            role = role_of(module)
            if role is None or role == who or (who == CORE and rel in WIRING):
                continue
            known = found.get((rel, line))
            if known is None or len(module) < len(known):  # `from M import N`: M, not M.N
                found[(rel, line)] = module
    return [
        f"{rel}:{line}: {owner(root / rel, root)} "
        + (module if module.startswith("starts ") else f"imports {module}")
        for (rel, line), module in sorted(found.items())
    ]


def started(tree: ast.AST, who: str) -> Iterator[tuple[int, str]]:
    """(line, "starts ...") for every place ``tree`` starts a role that is not ``who``: a
    call of a role's entry class, or a role's command spelled as consecutive arguments."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(
                node.func, "id", ""
            )  # fmt: skip
            if ROLE_ENTRIES.get(name, who) != who:
                yield node.lineno, f"starts {name}"
        items = node.elts if isinstance(node, ast.Tuple | ast.List) else None
        items = node.args if isinstance(node, ast.Call) else items
        words = [i.value if isinstance(i, ast.Constant) else None for i in items or []]
        for pair in itertools.pairwise(words):
            if pair in ROLE_COMMANDS and pair[0] != who:
                yield node.lineno, f"starts tandem {pair[0]} {pair[1]}"


def _sources(root: Path) -> Iterator[Path]:
    """The package's Python files: the core (not the links to the roles) and each role."""
    for top in (CORE, *ROLES):
        base = root / top
        for path in sorted(base.rglob("*.py")) if base.is_dir() else []:
            rel = path.relative_to(root).as_posix()
            inside_link = top == CORE and path.relative_to(base).parts[0] in ROLES
            if not inside_link and not rel.startswith(GENERATED):
                yield path


def main(argv: list[str]) -> int:
    """Print every breach under the repository (or ``argv[1]``); 1 when there is one."""
    root = Path(argv[1]) if len(argv) > 1 else Path(__file__).resolve().parents[1]
    problems = breaches(root)
    for line in problems:
        print(line)
    if problems:
        print(f"import contract: {len(problems)} breach(es); see tests/import_contract.py")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))

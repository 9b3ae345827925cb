"""The house plan, kept by a test: the folders of kvd/ are its layers, imports only go down, nothing imports in a
circle, and no function or file grows past the size a reader can hold in mind.

    root        kvd.daemon, kvd.cli, kvd.__main__   builds and runs everything
    rpc         kvd.rpc                             protobuf <-> value types, the listener
    service     kvd.service                         sessions, admission, operations
    transports  kvd.transports  |  tiers  kvd.tiers (side by side: neither imports the other)
    memory      kvd.memory                          the host pool
    bottom      kvd (package), types, errors, config, logs, metrics, process (the verified peer process: its
                identity is a value every layer above carries, from the credential socket to each copy)
    kvd_client  the client's value types, errors and wire: below everything in kvd, and imports nothing of it
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = {"kvd": ROOT / "kvd", "kvd_client": ROOT / "client" / "kvd_client"}
GENERATED = ROOT / "client" / "kvd_client" / "wire"

MAX_FUNCTION_LINES = 50
MAX_FILE_LINES = 400
# Files over the limits today, each with the branch that splits it and then deletes its line here. Nothing else.
SIZE_EXEMPT = {
}

# Layer of each module: (rank, name). A module may import only strictly lower ranks, or its own layer.
LAYERS = [
    (6, "root", ("kvd.daemon", "kvd.cli", "kvd.__main__")),
    (5, "rpc", ("kvd.rpc",)),
    (4, "service", ("kvd.service",)),
    (3, "transports", ("kvd.transports",)),
    (3, "tiers", ("kvd.tiers",)),
    (2, "memory", ("kvd.memory",)),
    (1, "bottom", ("kvd.types", "kvd.errors", "kvd.config", "kvd.logs", "kvd.metrics", "kvd.process", "kvd")),
    (0, "kvd_client", ("kvd_client",)),
]


def layer_of(module: str) -> tuple[int, str]:
    for rank, name, prefixes in LAYERS:  # most specific first: "kvd" (the package itself) comes last among kvd
        if any(module == p or (module.startswith(p + ".") and p != "kvd") for p in prefixes):
            return rank, name
    raise AssertionError(f"{module} is in no layer: give it a folder (or add it to LAYERS with a reason)")


def source_files() -> Iterator[tuple[str, Path]]:
    for package, directory in PACKAGES.items():
        for path in sorted(directory.rglob("*.py")):
            if GENERATED in path.parents:
                continue
            parts = path.relative_to(directory).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            yield ".".join((package, *parts)), path


MODULES = dict(source_files())


def resolve(name: str) -> str | None:
    """The project module `name` refers to (a submodule, or the module holding the imported attribute)."""
    while name:
        if name in MODULES:
            return name
        if name.startswith("kvd_client.wire"):
            return "kvd_client.wire"
        name = name.rpartition(".")[0]
    return None


def imports(module: str, path: Path) -> set[str]:
    """Every project module `module` imports, anywhere in the file (lazy imports in functions count too)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{alias.name}" for alias in node.names]
        for name in names:
            target = resolve(name)
            if target is not None and target != module:
                found.add(target)
    return found


GRAPH = {module: imports(module, path) for module, path in MODULES.items()}


def test_every_module_has_a_layer() -> None:
    for module in [*MODULES, "kvd_client.wire"]:
        layer_of(module)


def test_imports_only_go_down() -> None:
    upward = []
    for module, targets in GRAPH.items():
        rank, layer = layer_of(module)
        for target in targets:
            target_rank, target_layer = layer_of(target)
            if target_layer != layer and target_rank >= rank:
                upward.append(f"{module} ({layer}) imports {target} ({target_layer})")
    assert upward == []


def test_no_import_cycles() -> None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles: list[str] = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(GRAPH.get(module, ())):
            if state.get(target) == 1:
                cycles.append(" -> ".join([*path[path.index(target) :], target]))
            elif target not in state:
                visit(target, [*path, target])
        state[module] = 2

    for module in sorted(GRAPH):
        if module not in state:
            visit(module, [module])
    assert cycles == []


def test_the_checker_sees_an_upward_import() -> None:
    """The test above could pass by seeing nothing: it does see the daemon importing rpc, and would flag the
    reverse."""
    assert "kvd.rpc.server" in GRAPH["kvd.daemon"]
    assert layer_of("kvd.daemon")[0] > layer_of("kvd.rpc.server")[0]
    assert layer_of("kvd.tiers.chain") == (3, "tiers") and layer_of("kvd.transports.cpu") == (3, "transports")


def functions(tree: ast.AST) -> Iterator[ast.FunctionDef | ast.AsyncFunctionDef]:
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            yield node


@pytest.mark.parametrize("module", sorted(MODULES))
def test_sizes(module: str) -> None:
    path = MODULES[module]
    relative = str(path.relative_to(ROOT))
    if relative in SIZE_EXEMPT:
        pytest.skip(SIZE_EXEMPT[relative])
    text = path.read_text()
    assert len(text.splitlines()) <= MAX_FILE_LINES, f"{relative}: over {MAX_FILE_LINES} lines"
    long = [
        f"{f.name} ({(f.end_lineno or f.lineno) - f.lineno + 1} lines)"
        for f in functions(ast.parse(text))
        if (f.end_lineno or f.lineno) - f.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert long == [], f"{relative}: functions over {MAX_FUNCTION_LINES} lines"


def test_size_exemptions_are_still_needed() -> None:
    for relative in SIZE_EXEMPT:
        path = ROOT / relative
        if not path.exists():
            continue
        text = path.read_text()
        too_long = len(text.splitlines()) > MAX_FILE_LINES or any(
            (f.end_lineno or f.lineno) - f.lineno + 1 > MAX_FUNCTION_LINES for f in functions(ast.parse(text))
        )
        assert too_long, f"{relative} is within the limits now: delete its SIZE_EXEMPT line"

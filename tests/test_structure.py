"""The package's shape (docs/design.md §2): the math, the round engine, the ledger and the
removal import no Flower, no fl_ugm module imports another in a cycle (function-local and
``TYPE_CHECKING`` imports counted), and no module outgrows one concept."""

from __future__ import annotations

import ast
from pathlib import Path

import fl_ugm

PACKAGE = Path(fl_ugm.__file__).parent
MODULES = {path.stem: path for path in PACKAGE.glob("*.py")}
#: The layers below the Flower strategy (docs/design.md §2).
FLOWER_FREE = ("_kernels", "merge", "merge_rules", "robust", "server_optimizer", "engine",
               "fisher", "client_duals", "storage", "ledger", "removal", "replay")


def imported(name: str) -> tuple[set[str], set[str]]:
    """(the fl_ugm modules, the other top-level packages) module ``name`` imports anywhere in
    its source, at module level or inside functions and ``if TYPE_CHECKING:`` blocks."""
    tree = ast.parse(MODULES[name].read_text())
    ours, others = set(), set()
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module == "fl_ugm":
            # from fl_ugm import a_module (a submodule), or a name from the package's __init__
            targets = [f"fl_ugm.{a.name}" if a.name in MODULES else "fl_ugm"
                       for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            targets = [node.module]
        for target in targets:
            if target == "fl_ugm":
                ours.add("__init__")
            elif target.startswith("fl_ugm."):
                ours.add(target.split(".")[1])
            else:
                others.add(target.split(".")[0])
    return ours - {name}, others


def test_no_fl_ugm_module_imports_another_in_a_cycle():
    graph = {name: imported(name)[0] for name in MODULES}
    state: dict[str, str] = {}

    def visit(name: str, path: list[str]) -> None:
        state[name] = "open"
        for nxt in sorted(graph[name]):
            assert state.get(nxt) != "open", f"import cycle: {' -> '.join([*path, nxt])}"
            if nxt not in state:
                visit(nxt, [*path, nxt])
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


def test_the_layers_below_the_strategy_import_no_flower():
    for name in FLOWER_FREE:
        reached, todo = set(), [name]
        while todo:  # every fl_ugm module it reaches, directly or not
            current = todo.pop()
            if current not in reached:
                reached.add(current)
                todo += imported(current)[0]
        flower = sorted(m for m in reached if "flwr" in imported(m)[1])
        assert not flower, f"fl_ugm.{name} reaches Flower through {flower}"


def test_every_module_is_at_most_500_lines_and_fedugm_at_most_350():
    long = {name: n for name, path in MODULES.items()
            if (n := len(path.read_text().splitlines())) > 500}
    assert not long, f"modules over 500 lines: {long}"
    tree = ast.parse(MODULES["strategy"].read_text())
    (fedugm,) = [node for node in tree.body
                 if isinstance(node, ast.ClassDef) and node.name == "FedUGM"]
    assert fedugm.end_lineno - fedugm.lineno + 1 <= 350

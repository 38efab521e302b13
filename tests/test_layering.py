"""The layout's rules, checked on the source: no module imports from a layer above it
(not even inside a function), peers do not import each other, and the pure-math
layers never import Flower.

Every import statement is read from the syntax tree, wherever it stands, so an
import hidden in a function or under ``if TYPE_CHECKING`` counts as much as one at
the top of a file.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Folders of the repository that are not part of the `dpfl` package.
NOT_PACKAGE = {"tests", "benchmarks", "docker", "build", "docs", "runs", "deployment-runs"}

# Lowest first. A module may import from its own part and from parts of lower layers;
# parts that share a layer are independent of each other.
LAYERS: list[set[str]] = [
    {"dpfl", "errors", "progress", "flat"},  # the package itself and the vocabulary every layer shares
    {"records"},  # Flower records of flat tensors (no layer without Flower may import it: NO_FLOWER)
    {"privacy"},  # pure math: the DP mechanism and accounting
    {"task"},  # models, data sets, evaluation, recipes, im2col and layer hooks
    {"cim", "compression"},  # crossbar simulation of a task's models; decompositions of them
    {"settings"},  # a run's values and their validation
    {"secagg"},  # the SecAgg+ protocol on Flower's cryptographic primitives
    {"strategies", "deployment"},  # federated strategies; a node's compression and CIM deployment
    {"client"},  # the ClientApp
    {"server"},  # the ServerApp
    {"plugins"},  # the strategy smoke test, through the client's training
    {"engines"},  # running the apps: in-process, or a local Flower federation
    {"analysis"},  # comparisons of runs, the privacy audit
    {"cli"},  # parses, calls one library function, prints
]
RANK = {part: rank for rank, parts in enumerate(LAYERS) for part in parts}
# The layers below the strategies: no Flower, so they can be read, tested and reused without it.
NO_FLOWER = {"privacy", "task", "cim", "compression", "settings"}


def package_modules() -> dict[str, Path]:
    """``dpfl.<...>`` module name → file, for every module of the package."""
    modules = {}
    for path in sorted(ROOT.rglob("*.py")):
        relative = path.relative_to(ROOT)
        if relative.parts[0] in NOT_PACKAGE or relative.parts[0].startswith("."):
            continue
        parts = relative.with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(("dpfl", *parts))] = path
    return modules


MODULES = package_modules()


def part_of(module: str) -> str:
    """The top-level part of a ``dpfl`` module: ``dpfl.privacy.accountants.rdp`` → ``privacy``."""
    pieces = module.split(".")
    return pieces[1] if len(pieces) > 1 else "dpfl"


def imported_modules(module: str, path: Path) -> list[tuple[str, int]]:
    """(imported module, line) for every import statement in the file, at any depth."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.extend((alias.name, node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolved against the importing module's package
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                found.append((".".join([*base, *([node.module] if node.module else [])]), node.lineno))
            else:
                found.append((node.module or "", node.lineno))
    return found


def test_every_part_of_the_package_has_a_layer():
    assert {part_of(module) for module in MODULES} <= set(RANK), "a new top-level part needs a place in LAYERS"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_module_imports_from_a_layer_above_or_beside_it(module):
    own = part_of(module)
    wrong = [
        f"line {line}: {target} ({part_of(target)}, layer {RANK[part_of(target)]} >= {own}'s {RANK[own]})"
        for target, line in imported_modules(module, MODULES[module])
        if target.startswith("dpfl.") and part_of(target) != own and RANK[part_of(target)] >= RANK[own]
    ]
    assert not wrong, f"{module} imports upward or from a peer: " + "; ".join(wrong)


@pytest.mark.parametrize("module", sorted(m for m in MODULES if part_of(m) in NO_FLOWER))
def test_pure_math_layers_do_not_import_flower(module):
    flower = [f"line {line}: {target}" for target, line in imported_modules(module, MODULES[module])
              if target == "flwr" or target.startswith("flwr.")]  # fmt: skip
    assert not flower, f"{module} imports Flower: " + "; ".join(flower)


def test_the_walk_sees_imports_inside_functions(tmp_path):
    source = tmp_path / "example.py"
    source.write_text("def f():\n    from dpfl.cli.main import main\n    import dpfl.server.app\n")
    assert imported_modules("dpfl.task.example", source) == [("dpfl.cli.main", 2), ("dpfl.server.app", 3)]


def test_no_modules_import_each_other_in_a_circle():
    # Within a part the layers allow any import; a circle there (cli/audit.py and cli/simulate.py
    # once imported each other) means a module that belongs to neither, so it is refused too.
    graph = {
        module: {target for target, _ in imported_modules(module, MODULES[module]) if target in MODULES and target != module}
        for module in MODULES
    }
    cycles, state = [], {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                cycles.append(" -> ".join([*path[path.index(target):], target]))
            elif target not in state:
                visit(target, [*path, target])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, "modules import each other in a circle: " + "; ".join(cycles)

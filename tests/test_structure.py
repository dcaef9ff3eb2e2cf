"""The house holds its plan: no import cycle in the package, no import from a lower layer to
a higher one (``fl.LAYERS``), the two sides apart, and nothing at the top level but the
design card's modules and the commands people run."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

import fl

REPO = Path(__file__).resolve().parent.parent
TOP_LEVEL = {"server", "client", "model", "quantization", "protocol",  # the design card
             "simulate", "worker", "predict", "plot"}  # the commands


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted((REPO / "fl").rglob("*.py"))}


def imports_of(path: Path, known: set[str]) -> set[str]:
    """Every project module ``path`` imports, at any depth of the file (lazy imports too)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # "from fl.secagg import shamir" imports the module shamir, not the package's names
            names = [f"{node.module}.{a.name}" for a in node.names]
            if not all(n in known for n in names):
                names.append(node.module)
        else:
            continue
        for name in names:
            while name and name not in known and name.split(".")[0] in known | {"fl"}:
                name = name.rpartition(".")[0]
            if name in known:
                found.add(name)
    return found


def graph() -> dict[str, set[str]]:
    modules = package_modules()
    known = set(modules) | TOP_LEVEL
    return {name: imports_of(path, known) - {name} for name, path in modules.items()}


def layer(module: str) -> tuple[int, str]:
    """(rank, sub-package) of an ``fl.<sub>...`` module; the package's own ``fl`` is rank -1."""
    sub = module.split(".")[1] if "." in module else ""
    for rank, members in enumerate(fl.LAYERS):
        if sub in members:
            return rank, sub
    if module == "fl":
        return -1, ""
    raise AssertionError(f"{module}: sub-package {sub!r} is in no layer of fl.LAYERS")


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_package_has_no_import_cycle():
    cycle = find_cycle(graph())
    assert cycle is None, " -> ".join(cycle)


def test_no_import_runs_up_a_layer_or_across_to_the_other_side():
    wrong = []
    for module, targets in graph().items():
        rank, sub = layer(module)
        for target in targets:
            if not target.startswith("fl"):
                wrong.append(f"{module} imports the top-level {target}")
                continue
            t_rank, t_sub = layer(target)
            if t_rank > rank or (t_rank == rank and t_sub != sub):
                wrong.append(f"{module} (layer {rank} {sub}) imports {target} (layer {t_rank} {t_sub})")
    assert not wrong, "\n".join(wrong)


def test_every_sub_package_is_in_one_layer():
    subs = {p.name for p in (REPO / "fl").iterdir() if (p / "__init__.py").is_file()}
    placed = [s for members in fl.LAYERS for s in members]
    assert sorted(placed) == sorted(set(placed)), "a sub-package is in two layers"
    assert subs == set(placed)


def test_the_top_level_holds_the_design_card_and_the_commands_only():
    assert {p.stem for p in REPO.glob("*.py")} <= TOP_LEVEL


@pytest.mark.parametrize("name", sorted(TOP_LEVEL))
def test_top_level_modules_import_only_the_package_and_commands(name):
    path = REPO / f"{name}.py"
    if path.exists():
        assert imports_of(path, set(package_modules()) | TOP_LEVEL) <= set(package_modules()) | TOP_LEVEL


def test_the_checker_sees_a_cycle_and_a_wrong_way_import():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    assert layer("fl.server.app") > layer("fl.common.layout")
    assert layer("fl.client.host")[0] == layer("fl.server.app")[0]


def test_the_architecture_page_names_every_module():
    """docs/architecture.md has a line per module: a new one must be added there too."""
    page = (REPO / "docs" / "architecture.md").read_text()
    missing = [m for m, path in package_modules().items()
               if path.name != "__init__.py" and path.parent.name != "steps" and path.name not in page]
    assert not missing, f"not on docs/architecture.md: {missing}"

"""The package's shape: each sub-package is a layer, and a module imports only from its own layer or
lower ones, with no import cycle (top-level or inside a function) and no private name crossing a module."""

from __future__ import annotations

import ast
from pathlib import Path

import finetune

PACKAGE = Path(finetune.__file__).parent
# lowest first; packages on one line share a layer and may not import each other in a cycle
LAYERS = [("base",), ("config", "output"), ("core", "tasks"), ("models", "data"), ("engine",), ("recipes",), ("commands",),
          ("bench",), ("__init__", "__main__")]
RANK = {pkg: i for i, layer in enumerate(LAYERS) for pkg in layer}


def _modules() -> dict[str, ast.Module]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        name = ".".join(("finetune", *parts)).removesuffix(".__init__")
        out[name] = ast.parse(path.read_text(), str(path))
    return out


MODULES = _modules()


def _package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _resolve(name: str) -> str | None:
    """The finetune module `name` refers to (a module, or a name inside one)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(tree: ast.Module) -> list[tuple[str, str | None, int]]:
    """(module imported, name taken from it or None, line) for every import anywhere in the file."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, None, node.lineno) for a in node.names if a.name.startswith("finetune")]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("finetune"):
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                if sub in MODULES:  # `from finetune.engine import checkpoint`: the module itself
                    found.append((sub, None, node.lineno))
                else:
                    found.append((node.module, alias.name, node.lineno))
    return found


def _edges() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for module, tree in MODULES.items():
        for target, _, _ in _imports(tree):
            resolved = _resolve(target)
            if resolved and resolved != module and not module.startswith(resolved + ".") and resolved != "finetune":
                graph[module].add(resolved)
    return graph


def test_every_module_sits_in_a_known_layer():
    assert {_package(m) for m in MODULES} <= set(RANK), "a new sub-package needs its place in LAYERS"


def test_no_module_imports_from_a_higher_layer():
    upward = [f"{m} -> {t}" for m, targets in _edges().items() for t in targets
              if RANK[_package(t)] > RANK[_package(m)]]
    assert not upward


def test_no_import_cycle():
    graph, state, cycles = _edges(), {}, []

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(path[path.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles


def test_no_private_name_crosses_a_module():
    crossing = []
    for module, tree in MODULES.items():
        aliases = {}  # local name -> finetune module it is bound to
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("finetune"):
                for alias in node.names:
                    if f"{node.module}.{alias.name}" in MODULES:
                        aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}"
                    elif alias.name.startswith("_"):
                        crossing.append(f"{module}:{node.lineno} imports {node.module}.{alias.name}")
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                    and node.attr.startswith("_") and not node.attr.startswith("__")):
                crossing.append(f"{module}:{node.lineno} uses {aliases[node.value.id]}.{node.attr}")
    assert not crossing


def test_the_layer_checks_see_function_local_imports():
    tree = ast.parse("def f():\n    from finetune.commands import cli\n")
    assert [t for t, _, _ in _imports(tree)] == ["finetune.commands.cli"]


def test_the_config_has_one_source_of_defaults():
    """conf/train.yaml chooses config groups and sets Hydra's options, nothing else: every other default
    is the schema's, and what a group's file sets is the only other source."""
    import yaml

    from finetune.config.presets import conf_dir

    main = yaml.safe_load((conf_dir() / "train.yaml").read_text())
    assert set(main) == {"defaults", "hydra"}

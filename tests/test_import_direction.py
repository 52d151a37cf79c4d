"""Import direction: subpackages import one way, nothing imports in a cycle, heavy optional
dependencies stay out of module level. Read from the source with ``ast``, nothing is imported."""

import ast
import shutil
from pathlib import Path

import pytest

import sparsemup

ROOT = Path(sparsemup.__file__).parent

# Who may import whom. "api" is the package's face (sparsemup/__init__.py and the sparsemup.rules facade).
ALLOWED = {
    "core": {"core"},
    "sparse": {"core", "sparse"},
    "dynamic": {"core", "dynamic"},
    "models": {"core", "models"},
    "hf": {"core", "dynamic", "hf"},
    "benchmark": {"core", "sparse", "models", "benchmark"},
    "coord": {"core", "sparse", "dynamic", "models", "hf", "coord"},
    "train": {"core", "sparse", "dynamic", "models", "hf", "train"},
    "tuning": {"core", "sparse", "dynamic", "models", "hf", "coord", "train", "tuning"},
    "api": {"core", "sparse", "api"},
    "cli": {"core", "sparse", "dynamic", "models", "hf", "benchmark", "coord", "train", "tuning", "api", "cli"},
}
# Deprecated aliases kept for one release: (importing module, imported subpackage), allowed inside functions only.
ALIASES = {("sparsemup.sparse", "dynamic")}
TOP_LEVEL = {"__init__": "api", "rules": "api", "cli": "cli", "__main__": "cli"}
# Heavy optional dependencies: the only subpackages that may import them at module level (an extra's own
# subpackage: hf/ for transformers); everywhere else they are imported inside functions.
OPTIONAL = {"transformers": {"hf"}, "safetensors": {"hf"}, "ray": set(), "optuna": set(),
            "accelerate": set(), "tokenizers": set()}
# Subpackages that import an optional dependency at module level: others import them inside functions too.
EXTRAS = {"sparsemup.hf": "hf"}


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(["sparsemup", *parts])


def layer(module: str, root: Path) -> str:
    parts = module.split(".")[1:]
    if not parts:
        return "api"
    if (root / parts[0]).is_dir():
        return parts[0]
    return TOP_LEVEL.get(parts[0], parts[0])


def _resolve(module: str, is_package: bool, level: int, name: str | None, where: str) -> str:
    package = module.split(".") if is_package else module.split(".")[:-1]
    if level > len(package):
        raise AssertionError(f"{where}: relative import beyond the top-level package")
    return ".".join(package[: len(package) - level + 1] + ([name] if name else []))


def imports(path: Path, root: Path) -> list[tuple[str, int, bool]]:
    """(imported module, line, at module level) for every import in the file: relative ones resolved,
    ``importlib.import_module`` / ``__import__`` of a literal name included. An import is at module level
    unless a function (or lambda) encloses it; ``try``/``if``/``class`` bodies do not make it lazy."""
    module = module_name(path, root)
    is_package = path.name == "__init__.py"
    found: list[tuple[str, int, bool]] = []

    def walk(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            lazy = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            where = f"{path.relative_to(root)}:{getattr(child, 'lineno', 0)}"
            if isinstance(child, ast.Import):
                found.extend((alias.name, child.lineno, not in_function) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                target = _resolve(module, is_package, child.level, child.module, where) if child.level \
                    else child.module or ""
                for alias in child.names:  # ``from . import x`` may name a submodule: count it as that module
                    sub = f"{target}.{alias.name}"
                    inner = root.joinpath(*sub.split(".")[1:])
                    is_module = sub.startswith("sparsemup.") and (inner.with_suffix(".py").is_file() or inner.is_dir())
                    found.append((sub if is_module else target, child.lineno, not in_function))
            elif isinstance(child, ast.Call) and child.args and isinstance(child.args[0], ast.Constant) \
                    and isinstance(child.args[0].value, str):
                func = child.func
                called = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
                if called in ("import_module", "__import__"):
                    found.append((child.args[0].value, child.lineno, not in_function))
            walk(child, lazy)

    walk(ast.parse(path.read_text()), False)
    return found


def violations(root: Path) -> list[str]:
    """Every forbidden edge, module-level optional import and import cycle in the package at ``root``."""
    problems = []
    graph: dict[str, set[str]] = {}
    for path in sorted(root.rglob("*.py")):
        module = module_name(path, root)
        graph[module] = set()
        for target, line, module_level in imports(path, root):
            where = f"{path.relative_to(root)}:{line}"
            head = target.split(".")[0]
            if head in OPTIONAL and module_level and layer(module, root) not in OPTIONAL[head]:
                problems.append(f"{where}: module-level import of the optional dependency {head!r}")
            if head != "sparsemup":
                continue
            extra = next((layer_ for pkg, layer_ in EXTRAS.items() if target == pkg or target.startswith(pkg + ".")),
                         None)
            if extra is not None and module_level and layer(module, root) != extra:
                problems.append(f"{where}: module-level import of {target}, which needs an optional dependency")
            graph[module].add(target)
            source, dest = layer(module, root), layer(target, root)
            if not module_level and (module, dest) in ALIASES:
                continue
            if dest not in ALLOWED.get(source, set()):
                problems.append(f"{where}: {source} may not import {dest} ({module} imports {target})")
    # Cycles among modules (imports inside functions included: they hide cycles, they do not break them).
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if nxt not in graph:
                continue
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt] if nxt in stack else [node, nxt]
                problems.append("import cycle: " + " -> ".join(cycle))
            elif nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return problems


def test_the_package_imports_one_way_without_cycles():
    assert violations(ROOT) == []


def test_every_subpackage_has_a_place_in_the_table():
    for path in ROOT.iterdir():
        if path.is_dir() and (path / "__init__.py").exists():
            assert path.name in ALLOWED, f"new subpackage {path.name}: add its allowed imports to ALLOWED"
        elif path.suffix == ".py":
            assert path.stem in TOP_LEVEL, f"new top-level module {path.name}: give it a layer in TOP_LEVEL"


@pytest.mark.parametrize("file, line, expected", [
    ("core/rules.py", "from ..train import schema", "core may not import train"),
    ("sparse/backend.py", "from ..models import GPT", "sparse may not import models"),
    ("train/data.py", "from . import validate", "import cycle"),
    ("coord/figures.py", "import transformers", "module-level import of the optional dependency 'transformers'"),
    ("train/data.py", "try:\n    import optuna\nexcept ImportError:\n    optuna = None",
     "module-level import of the optional dependency 'optuna'"),
    ("tuning/store.py", "if True:\n    import ray", "module-level import of the optional dependency 'ray'"),
    ("train/build.py", "from ..hf import build", "module-level import of sparsemup.hf"),
    ("core/masks.py", "def _later():\n    import importlib\n\n    return importlib.import_module('sparsemup.train')",
     "core may not import train"),
    ("models/gpt.py", "def _later():\n    import sparsemup.sparse\n\n    return sparsemup.sparse",
     "models may not import sparse"),
    ("dynamic/methods.py", "from ..sparse import sparsify", "dynamic may not import sparse"),
    ("sparse/__init__.py", "import sparsemup.dynamic", "sparse may not import dynamic"),  # the alias: lazy only
    ("sparse/backend.py", "def _later():\n    import sparsemup.dynamic\n\n    return sparsemup.dynamic",
     "sparse may not import dynamic"),
    ("sparse/backend.py", "from ..benchmark import run", "sparse may not import benchmark"),
])
def test_a_forbidden_import_is_reported(tmp_path, file, line, expected):
    copy = tmp_path / "sparsemup"
    shutil.copytree(ROOT, copy, ignore=shutil.ignore_patterns("__pycache__"))
    target = copy / file
    target.write_text(target.read_text() + f"\n{line}\n")
    found = violations(copy)
    assert any(expected in p for p in found), found


def test_an_optional_dependency_imported_inside_a_function_is_allowed(tmp_path):
    copy = tmp_path / "sparsemup"
    shutil.copytree(ROOT, copy, ignore=shutil.ignore_patterns("__pycache__"))
    target = copy / "tuning" / "sweep.py"
    target.write_text(target.read_text() + "\n\ndef _engine():\n    import ray\n\n    return ray\n")
    assert violations(copy) == []


def test_the_vocabulary_matches_what_implements_it():
    from sparsemup.core.rules import SCHEMES
    from sparsemup.core.storage import storage_formats
    from sparsemup.core.vocab import BACKEND_CHOICES, BACKENDS, SCHEME_NAMES

    assert tuple(SCHEMES) == SCHEME_NAMES
    assert set(storage_formats()) | {"masked_dense"} == set(BACKENDS)  # every backend but the core's own is a storage
    assert set(BACKEND_CHOICES) == {"auto", *BACKENDS}

"""The one-way layering of STYLE.md: the runtime never imports compiler or frontend code, and
no module of the package imports itself through others."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN_IN_RUNTIME = (
    "relaxlm.compiler",
    "relaxlm.frontends",
    "tvm.relax.frontend",
    "transformers",
    "torch",
)


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def test_runtime_imports_no_compiler_code():
    for path in [*(ROOT / "runtime").glob("*.py"), *(ROOT / "artifacts").glob("*.py")]:
        bad = [n for n in _imports(path) if n.startswith(FORBIDDEN_IN_RUNTIME)]
        assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


def test_frontends_know_nothing_of_the_compiler():
    for path in (ROOT / "frontends").glob("*.py"):
        bad = [n for n in _imports(path) if n.startswith(("relaxlm.compiler", "relaxlm.runtime"))]
        assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


def test_the_server_reaches_the_engine_only_through_the_sdk():
    """relaxlm/server/ drives the model through relaxlm.sdk (AsyncLLM), never the engine."""
    forbidden = ("relaxlm.runtime.engine", "relaxlm.runtime.scheduler")
    for path in (ROOT / "relaxlm" / "server").glob("*.py"):
        names = _imports(path)
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.ImportFrom) and node.module
            ):  # from relaxlm.runtime import engine
                names |= {f"{node.module}.{a.name}" for a in node.names}
        bad = [n for n in names if n.startswith(forbidden)]
        assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


# The package's folders and the modules they hold (pyproject's package-dir).
PACKAGES = {
    "relaxlm": "relaxlm",
    "compiler": "relaxlm.compiler",
    "frontends": "relaxlm.frontends",
    "runtime": "relaxlm.runtime",
    "artifacts": "relaxlm.artifacts",
}


def _modules() -> dict[str, Path]:
    """Module name -> file, for every module of the package."""
    modules = {}
    for folder, package in PACKAGES.items():
        for path in (ROOT / folder).rglob("*.py"):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            modules[".".join([package, *(p for p in parts if p != "__init__")])] = path
    return modules


def _imported_modules(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's modules that `name` imports anywhere in its file (in functions too: a
    deferred import still ties the two modules together)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                head = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{head}.{base}" if base else head
            # `from package import module` imports the module; `from module import name`, it
            found |= {
                f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names
            }
    return {m for m in found if m in modules and m != name}


def test_no_import_cycles():
    modules = _modules()
    graph = {name: _imported_modules(name, path, modules) for name, path in modules.items()}
    done: set[str] = set()

    def visit(name: str, trail: list[str]) -> None:
        if name in trail:
            cycle = trail[trail.index(name) :] + [name]
            raise AssertionError("import cycle: " + " -> ".join(cycle))
        if name in done:
            return
        for other in sorted(graph[name]):
            visit(other, [*trail, name])
        done.add(name)

    for name in sorted(graph):
        visit(name, [])

"""The one-way layering of STYLE.md: the runtime never imports compiler or frontend code."""

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

"""The import graph has no circles: read from the code's own imports (module level and inside functions alike).

Issue 26: circles made every change in ``models/`` touch modules that had nothing to do with it (metrics living in
the classifier trainer, a split helper in the anatomy trainer, plots in the evaluation command). The graph is built
with :mod:`ast` over every module of a package, an edge ``a -> b`` for every ``import b`` / ``from b import ...``
anywhere in ``a``; strongly connected components of more than one module are circles.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(packages: tuple[str, ...]) -> dict[str, set[str]]:
    """Module -> the modules of ``packages`` it imports (a ``from pkg import name`` naming a module counts as it)."""
    modules = {module_name(p): p for pkg in packages for p in sorted((REPO / pkg).rglob("*.py"))}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            for target in targets:
                if target in modules and target != name:
                    graph[name].add(target)
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_graph_reader_finds_a_circle() -> None:
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert circles({"a": {"b"}, "b": set()}) == []


@pytest.mark.parametrize("packages", [("models",), ("daemon",), ("daemon", "models")])
def test_no_import_circle(packages: tuple[str, ...]) -> None:
    found = circles(import_graph(packages))
    assert not found, f"import circles in {'/, '.join(packages)}/: {found}"


#: daemon/'s sub-packages, one per stage in the order data flows, then what they share (issue 26).
DAEMON_PACKAGES = ("receive", "assemble", "queue", "analyse", "output", "dispatch", "store", "config", "dicom", "ops")


def stage_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """The module graph read one level up: ``daemon.<sub-package>`` (or a top module such as ``daemon.cli``)."""
    def stage(module: str) -> str:
        return ".".join(module.split(".")[:2])

    stages: dict[str, set[str]] = {}
    for module, targets in graph.items():
        stages.setdefault(stage(module), set()).update(stage(t) for t in targets if stage(t) != stage(module))
    return stages


def test_daemon_is_one_sub_package_per_stage() -> None:
    top = sorted(p.name for p in (REPO / "daemon").iterdir() if p.is_dir() and (p / "__init__.py").is_file())
    assert top == sorted(DAEMON_PACKAGES)
    modules = sorted(p.stem for p in (REPO / "daemon").glob("*.py") if p.stem != "__init__")
    assert modules == ["cli", "serve"], "a module at daemon/'s top: give it the stage it belongs to"
    for name in DAEMON_PACKAGES:
        doc = ast.get_docstring(ast.parse((REPO / "daemon" / name / "__init__.py").read_text()))
        assert doc, f"daemon/{name}/__init__.py says what enters and what leaves"


def test_no_import_circle_between_daemon_stages() -> None:
    found = circles(stage_graph(import_graph(("daemon",))))
    assert not found, f"import circles between daemon's sub-packages: {found}"


def test_the_listener_process_loads_neither_torch_nor_models() -> None:
    """serve's listener process (receive, assemble, status page, metrics) imports no torch and no model code."""
    import subprocess
    import sys

    code = ("import sys, daemon.serve, daemon.receive.listener, daemon.ops.status_page, daemon.ops.metrics; "
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith(('torch.', 'models.'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[0] == "['models.anatomy_vocabulary']"


#: models/'s sub-packages, in the order a model is made and used (issue 26); cli, the anatomy vocabulary and the
#: display image (what the daemon shares with the models) stay at the top.
MODELS_PACKAGES = ("data", "nets", "metrics", "train", "inference", "eval")


def test_models_is_one_sub_package_per_job() -> None:
    top = sorted(p.name for p in (REPO / "models").iterdir() if p.is_dir() and (p / "__init__.py").is_file())
    assert top == sorted(MODELS_PACKAGES)
    modules = sorted(p.stem for p in (REPO / "models").glob("*.py") if p.stem != "__init__")
    assert modules == ["anatomy_vocabulary", "cli", "display_image"], "a module at models/'s top: give it its job"
    for name in MODELS_PACKAGES:
        doc = ast.get_docstring(ast.parse((REPO / "models" / name / "__init__.py").read_text()))
        assert doc, f"models/{name}/__init__.py says what enters and what leaves"


def test_models_never_import_the_daemon() -> None:
    """daemon -> models is how inference is called; models -> daemon would make the two one tangle again."""
    graph = import_graph(("daemon", "models"))
    found = sorted(f"{a} -> {b}" for a, targets in graph.items() if a.split(".")[0] == "models"
                   for b in targets if b.split(".")[0] == "daemon")
    # also a bare ``import daemon`` or a name the graph would not resolve to a module
    for path in sorted((REPO / "models").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
            found += [f"{module_name(path)} -> {n}" for n in names if n.split(".")[0] == "daemon"]
    assert not found, f"models/ imports the daemon: {sorted(set(found))}"


def models_package_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """The models graph one level up: ``models.<sub-package>`` (or a top module such as ``models.cli``)."""
    def package(module: str) -> str:
        return ".".join(module.split(".")[:2])

    packages: dict[str, set[str]] = {}
    for module, targets in graph.items():
        packages.setdefault(package(module), set()).update(
            package(t) for t in targets if package(t) != package(module))
    return packages


def test_no_import_circle_between_models_packages() -> None:
    found = circles(models_package_graph(import_graph(("models",))))
    assert not found, f"import circles between models' sub-packages: {found}"


def test_the_graph_tests_see_a_models_circle_and_a_daemon_import(tmp_path, monkeypatch) -> None:
    """The models tests fail on what they guard against: a circle inside models/ and a models -> daemon import."""
    for rel, text in {"models/__init__.py": "", "models/a/__init__.py": "", "models/b/__init__.py": "",
                      "models/a/x.py": "from models.b.y import f\n",
                      "models/b/y.py": "def f():\n    from models.a.x import g\n",
                      "models/b/z.py": "import daemon.analyse.rules\n",
                      "daemon/__init__.py": "", "daemon/analyse/__init__.py": "", "daemon/analyse/rules.py": ""}.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    monkeypatch.setattr(__import__(__name__, fromlist=["REPO"]), "REPO", tmp_path)
    assert circles(import_graph(("models",))) == [["models.a.x", "models.b.y"]]
    assert circles(models_package_graph(import_graph(("models",)))) == [["models.a", "models.b"]]
    with pytest.raises(AssertionError, match="models.b.z -> daemon.analyse.rules"):
        test_models_never_import_the_daemon()

"""The import rules of docs/architecture.md, read off the source: which folder may import which, and no loops.

Every ``import`` and ``from ... import`` of every module of the project packages counts, at module
level or inside a function, a class or a ``try``, and so does ``importlib.import_module("...")``
with a literal name: a component body imports its code inside the function, so a check of the
modules one import loads (``tests/toptagger/test_dependencies.py``) does not see those. Relative
imports are resolved against the module's package. A cycle hidden in a function body works until
someone moves the import to the top, or imports the modules in the other order.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("toptagger", "components", "pipelines", "serving", "fpga_runtime", "benchmarks")
# What each package must not import, anywhere. pipelines/ is the top: it wires and compiles the
# components, and nothing imports it. toptagger/ is the library the others build on.
FORBIDDEN = {
    "toptagger": ("kfp", "components", "pipelines", "serving", "benchmarks"),
    "components": ("pipelines",),
    "serving": ("pipelines",),
    "fpga_runtime": ("pipelines",),
    "benchmarks": ("pipelines",),
}


def module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, root: Path) -> Iterator[tuple[int, str]]:
    """``(line, absolute module name)`` of every import in ``path``, wherever in the file it is."""
    name = module_name(path, root)
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join([*package[: len(package) - node.level + 1], *([base] if base else [])])
            for alias in node.names:  # `from pkg import module` imports pkg.module
                yield node.lineno, f"{base}.{alias.name}" if alias.name != "*" else base
        elif (
            isinstance(node, ast.Call)
            and (getattr(node.func, "attr", None) or getattr(node.func, "id", None)) in ("import_module", "__import__")
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            yield node.lineno, node.args[0].value


def import_graph(root: Path) -> dict[str, set[str]]:
    """Each project module under ``root`` and the project modules it imports (a name inside a module counts as it)."""
    paths = {
        module_name(p, root): p
        for package in PACKAGES
        if (root / package).is_dir()
        for p in (root / package).rglob("*.py")
    }
    graph: dict[str, set[str]] = {}
    for name, path in paths.items():
        graph[name] = set()
        for _, target in imports(path, root):
            while target and target not in paths:
                target = target.rpartition(".")[0]
            if target and target != name:
                graph[name].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan, iteratively)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        while work:
            node, edges = work[-1]
            for nxt in edges:
                if nxt not in index:
                    index[nxt] = low[nxt] = len(index)
                    stack.append(nxt)
                    work.append((nxt, iter(sorted(graph[nxt]))))
                    break
                if nxt in stack:
                    low[node] = min(low[node], index[nxt])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
    return found


def violations(root: Path, forbidden: dict[str, tuple[str, ...]]) -> list[str]:
    """``file:line imports NAME`` for each import that ``forbidden`` rules out, over the packages under root."""
    found = []
    for package, above in forbidden.items():
        for path in sorted((root / package).rglob("*.py")):
            for line, target in imports(path, root):
                if target.split(".")[0] in above:
                    found.append(f"{path.relative_to(root)}:{line} imports {target}")
    return sorted(found)


def test_the_import_reader_finds_imports_in_function_bodies_and_relative_ones(tmp_path: Path) -> None:
    """The check can fail: a synthetic tree with the imports that a top-level scan would miss."""
    files = {
        "toptagger/__init__.py": "",
        "toptagger/deploy/__init__.py": "",
        "toptagger/deploy/job.py": "import os\n\ndef run():\n    from pipelines.compile import main\n",
        "toptagger/deploy/cli.py": "from . import job\nfrom ..deploy.job import run\n",
        "toptagger/late.py": "import importlib\nclass A:\n    def f(self):\n        importlib.import_module('kfp')\n",
        "components/step.py": "try:\n    import pipelines.top_tagging as tt\nexcept ImportError:\n    pass\n",
        "components/ok.py": "from toptagger.deploy import job\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    cli = sorted(target for _, target in imports(tmp_path / "toptagger/deploy/cli.py", tmp_path))
    assert cli == ["toptagger.deploy.job", "toptagger.deploy.job.run"]
    assert violations(tmp_path, {"toptagger": FORBIDDEN["toptagger"], "components": FORBIDDEN["components"]}) == [
        "components/step.py:2 imports pipelines.top_tagging",
        "toptagger/deploy/job.py:4 imports pipelines.compile.main",
        "toptagger/late.py:4 imports kfp",
    ]


def test_no_package_imports_what_is_above_it() -> None:
    assert set(FORBIDDEN) < set(PACKAGES)
    found = violations(REPO, FORBIDDEN)
    assert not found, "imports against docs/architecture.md's dependency rules:\n" + "\n".join(found)


def test_the_cycle_finder_finds_a_loop_through_a_function_body(tmp_path: Path) -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
    files = {
        "serving/__init__.py": "",
        "serving/a.py": "import os\n\ndef f():\n    from serving import b\n",
        "serving/b.py": "from .a import f\n",
        "serving/c.py": "from serving.a import f\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert cycles(import_graph(tmp_path)) == [["serving.a", "serving.b"]]


def test_no_module_imports_itself_around_a_loop() -> None:
    graph = import_graph(REPO)
    assert "fpga_runtime.engine" in graph and "benchmarks.serving" in graph  # the walk found the modules
    looping = cycles(graph)
    assert not looping, f"modules that import each other: {looping}"


def test_the_components_image_copies_every_package_the_components_import() -> None:
    """``components/Dockerfile`` copies the packages of every project module a component reaches."""
    from tests.serving.test_image import copied_paths

    graph = import_graph(REPO)
    reached, todo = set(), [name for name in graph if name.startswith("components.")]
    while todo:
        name = todo.pop()
        if name not in reached:
            reached.add(name)
            todo += graph[name]
    packages = {name.split(".")[0] for name in reached}
    assert {"components", "toptagger", "serving"} <= packages  # the walk followed the imports
    copied = set(copied_paths(REPO / "components" / "Dockerfile"))
    assert packages <= copied, f"components/Dockerfile does not copy {sorted(packages - copied)}"

"""The package's shape stays as designed: no import cycles between its modules, and the CLI's
help and its parser load no torch (they answer in about a second)."""

import ast
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PKG = SRC / "saesweep"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def module_level_imports(path: Path, modules: set[str], deep: bool = False) -> set[str]:
    """saesweep modules that ``path`` imports when it is imported (statements at module level,
    outside ``if TYPE_CHECKING:``), resolved to modules: ``from a import b`` is ``a.b`` when
    that is a module, else ``a``. With ``deep``, also the imports inside functions and classes
    (what a call may import later)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()

    def visit(stmts):
        for node in stmts:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                continue
            if deep and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.With, ast.For,
                                          ast.While)):
                visit(node.body)
            if isinstance(node, (ast.If, ast.Try)):
                visit(node.body)
                visit(getattr(node, "orelse", []))
                for h in getattr(node, "handlers", []):
                    visit(h.body)
            elif isinstance(node, ast.Import):
                out.update(a.name for a in node.names if a.name in modules)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
                for a in node.names:
                    sub = f"{base}.{a.name}"
                    if sub in modules:
                        out.add(sub)
                    elif base in modules:
                        out.add(base)

    visit(ast.parse(path.read_text()).body)
    out.discard(name)
    return out


@pytest.mark.parametrize("deep", [False, True], ids=["module-level", "with-function-level"])
def test_no_import_cycles(deep):
    """No cycle among the imports a module runs when it is loaded, nor among those its functions
    run later (a function-level import hides a cycle; it does not remove it)."""
    files = sorted(PKG.rglob("*.py"))
    modules = {module_name(f) for f in files}
    graph = {module_name(f): module_level_imports(f, modules, deep) for f in files}
    # Tarjan's strongly connected components: any with two or more modules is a cycle
    index, low, stack, on, cycles, counter = {}, {}, [], set(), [], [0]

    def strong(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    sys.setrecursionlimit(10_000)
    for v in graph:
        if v not in index:
            strong(v)
    assert not cycles, f"import cycles: {cycles}"


def test_folders_import_one_way():
    """Activation sources offer ports and know nothing of the metrics computed on them; the
    configs know nothing of the metrics' computation (the names table sits below both)."""
    files = sorted(PKG.rglob("*.py"))
    modules = {module_name(f) for f in files}
    for folder, below in (("data", "saesweep.metrics"), ("config", "saesweep.metrics")):
        for f in sorted((PKG / folder).rglob("*.py")):
            up = sorted(m for m in module_level_imports(f, modules, True) if m.startswith(below))
            assert not up, f"{module_name(f)} imports {up}"


def test_the_cycle_check_finds_a_cycle(tmp_path, monkeypatch):
    """The check above can fail: two modules importing each other are reported."""
    pkg = tmp_path / "saesweep"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from saesweep import b\n")
    (pkg / "b.py").write_text("from saesweep.a import x\n")
    (pkg / "c.py").write_text("def f():\n    from saesweep import d\n")  # hidden in a function
    (pkg / "d.py").write_text("import saesweep.c\n")
    monkeypatch.setattr(sys.modules[__name__], "SRC", tmp_path)
    monkeypatch.setattr(sys.modules[__name__], "PKG", pkg)
    with pytest.raises(AssertionError, match=r"import cycles: \[\['saesweep.a', 'saesweep.b'\]\]\n"):
        test_no_import_cycles(deep=False)
    with pytest.raises(AssertionError, match="'saesweep.c', 'saesweep.d'"):
        test_no_import_cycles(deep=True)


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"], ["sweep", "--help"], ["grid"],
                                  ["grid", "--sae_types", "topk,matryoshka,jumprelu"]])
def test_cli_help_and_grid_import_no_torch(argv, tmp_path):
    """Once a version of the package has been seen (its architectures' declarations are cached on
    first use), help and grids load no torch."""
    from saesweep.saes import declare

    env = dict(os.environ, SAESWEEP_CACHE=str(tmp_path))
    subprocess.run([sys.executable, "-c", "from saesweep.saes import registry; registry.declarations()"],
                   env=env, check=True, timeout=120)
    assert (tmp_path / "declarations" / f"{declare.source_digest()}.json").is_file()
    code = ("import sys, runpy; sys.argv = ['saesweep', *sys.argv[1:]]\n"
            "try:\n    runpy.run_module('saesweep', run_name='__main__')\nexcept SystemExit:\n    pass\n"
            "print('TORCH' if 'torch' in sys.modules else 'NO TORCH', file=sys.stderr)")
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=60, env=env)
    wall = time.perf_counter() - t
    assert "usage: saesweep" in proc.stdout or "experiments" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert proc.stderr.strip().endswith("NO TORCH"), proc.stderr[-2000:]
    print(f"saesweep {' '.join(argv)}: {wall:.2f} s")


def test_every_environment_variable_is_declared_in_one_place_and_documented():
    import re

    from saesweep.settings import SETTINGS

    src = Path(__file__).resolve().parents[1] / "src" / "saesweep"
    named = {m for p in src.rglob("*.py") for m in re.findall(r"SAESWEEP_[A-Z_]+", p.read_text())}
    declared = {s.name for s in SETTINGS}
    assert named == declared
    # read through settings.env only: no module but settings asks os.environ for one
    for p in src.rglob("*.py"):
        if p.name != "settings.py":
            assert not re.search(r"environ(\.get)?[\[(]\s*[\"']SAESWEEP_", p.read_text()), p
    readme = (src.parents[1] / "docs" / "contributing.md").read_text()
    assert all(f"`{name}`" in readme for name in declared)

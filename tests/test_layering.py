"""The package's layers import without cycles: models (with kernels and heads) at the bottom, then data/metrics,
analysis, surgery, training/adaptation, cli. Checked on the source (every import, those inside functions too, since
a lazy import is a cycle postponed) and by importing every module in a fresh process; `import moe_adapt` loads no
peft."""

import ast
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "moe_adapt"
#: the layers that must not import anything above themselves (a sibling listed here is allowed)
BOTTOM = {"kernels": set(), "heads": set(), "models": {"kernels", "heads", "io"}}


def modules() -> dict[str, tuple[Path, bool]]:
    """{dotted module name: (file, is a package)} for every module of the package."""
    found = {}
    for path in (ROOT / PACKAGE).rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        found[".".join(parts[:-1] if is_pkg else parts)] = (path, is_pkg)
    return found


def import_graph() -> dict[str, set[str]]:
    """{module: the package's modules it imports}, from every import statement in its source. `from pkg import x`
    counts as importing submodule `pkg.x` when x is one, else `pkg`; a module's own parent packages are always
    imported before it and are not edges."""
    found = modules()
    graph = {}
    for name, (path, is_pkg) in found.items():
        base = name.split(".") if is_pkg else name.split(".")[:-1]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                mod = (
                    ".".join(base[: len(base) - node.level + 1] + ([node.module] if node.module else []))
                    if node.level
                    else node.module or ""
                )
                subs = [f"{mod}.{a.name}" for a in node.names if f"{mod}.{a.name}" in found]
                targets = subs or [mod]
            else:
                continue
            deps |= {t for t in targets if t in found and t != name and not name.startswith(t + ".")}
        graph[name] = deps
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one node (Tarjan's algorithm, iterative)."""
    index, low, on_stack, stack, out, counter = {}, {}, set(), [], [], 0
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph.get(root, ()))))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            v, children = work[-1]
            for w in children:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph.get(w, ())))))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        comp.append(w)
                        if w == v:
                            break
                    if len(comp) > 1:
                        out.append(sorted(comp))
    return out


def layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else PACKAGE


def layer_graph() -> dict[str, set[str]]:
    graph = {}
    for module, deps in import_graph().items():
        for dep in deps:
            if layer(dep) != layer(module):
                graph.setdefault(layer(module), set()).add(layer(dep))
    return graph


def test_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_module_imports_itself_back():
    found = cycles(import_graph())
    assert not found, "import cycles between modules: " + "; ".join(" <-> ".join(c) for c in found)


def test_no_layer_imports_itself_back():
    found = cycles(layer_graph())
    assert not found, "import cycles between layers: " + "; ".join(" <-> ".join(c) for c in found)


@pytest.mark.parametrize("bottom", sorted(BOTTOM))
def test_bottom_layers_import_nothing_above_them(bottom):
    above = layer_graph().get(bottom, set()) - BOTTOM[bottom]
    assert not above, f"moe_adapt.{bottom} imports {sorted(above)}"


def test_every_module_imports_in_a_fresh_process_and_moe_adapt_loads_no_peft():
    names = sorted(m.name for m in pkgutil.walk_packages([str(ROOT / PACKAGE)], prefix=PACKAGE + "."))
    code = (
        "import sys, importlib\n"
        "import moe_adapt\n"
        "assert 'peft' not in sys.modules, 'import moe_adapt loaded peft'\n"
        f"for name in {names!r}:\n"
        "    importlib.import_module(name)\n"
        "print('ok')\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-3000:]

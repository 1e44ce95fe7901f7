"""The one-way layering of the package: pipeline <- cache <- students <- commands <- cli (bench/ and tests/ above
all), and no circle of imports between modules. Every import counts, a lazy one inside a function too."""

import ast
from pathlib import Path

from conftest import ROOT

LAYERS = ["pipeline", "cache", "students", "commands", "cli"]
ABOVE_ALL = ("bench", "tests", "conftest")


def modules(root: Path) -> dict[str, Path]:
    """{dotted module name: file} of the layered packages and cli.py under root."""
    out = {f"{f.parent.name}.{f.stem}" if f.stem != "__init__" else f.parent.name: f
           for pkg in LAYERS[:-1] for f in sorted((root / pkg).glob("*.py"))}
    if (root / "cli.py").exists():
        out["cli"] = root / "cli.py"
    return out


def imports(file: Path) -> list[tuple[int, str]]:
    """(line, module) of every absolute import in a file, wherever it stands."""
    found = []
    for n in ast.walk(ast.parse(file.read_text())):
        if isinstance(n, ast.Import):
            found += [(n.lineno, a.name) for a in n.names]
        elif isinstance(n, ast.ImportFrom) and n.module and not n.level:
            found.append((n.lineno, n.module))
    return found


def layer(module: str) -> int | None:
    top = module.split(".")[0]
    return LAYERS.index(top) if top in LAYERS else None


def violations(root: Path) -> list[str]:
    """Every upward import and every circle of module imports under root, as readable lines."""
    mods = modules(root)
    problems, graph = [], {m: set() for m in mods}
    for mod, file in mods.items():
        for line, target in imports(file):
            where = f"{file.relative_to(root)}:{line} imports {target}"
            if target.split(".")[0] in ABOVE_ALL:
                problems.append(f"{where}, which sits above the package")
            elif layer(target) is not None and layer(target) > layer(mod):
                problems.append(f"{where}, a higher layer")
            name = next((m for m in (target, target.rsplit(".", 1)[0]) if m in mods and m != mod), None)
            if name:
                graph[mod].add(name)
    problems += [f"circle of imports: {' -> '.join(c)}" for c in circles(graph)]
    return problems


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected group of more than one module (depth-first search)."""
    found, done = [], set()

    def visit(node, path):
        if node in path:
            cycle = path[path.index(node):] + [node]
            if not any(set(cycle) == set(c) for c in found):
                found.append(cycle)
            return
        if node in done:
            return
        for nxt in sorted(graph[node]):
            visit(nxt, path + [node])
        done.add(node)

    for node in sorted(graph):
        visit(node, [])
    return found


def test_the_package_imports_only_downward_and_without_circles():
    assert violations(ROOT) == []


def test_the_check_finds_an_upward_import_a_lazy_one_and_a_circle(tmp_path):
    """The checker on a small tree of its own: what it must refuse, it names."""
    for pkg in LAYERS[:-1]:
        (tmp_path / pkg).mkdir()
        (tmp_path / pkg / "__init__.py").write_text("")
    (tmp_path / "pipeline" / "a.py").write_text("from cache.b import x\n")
    (tmp_path / "cache" / "b.py").write_text("def f():\n    import students.c\n")
    (tmp_path / "students" / "c.py").write_text("import students.d\n")
    (tmp_path / "students" / "d.py").write_text("from students.c import y\nimport bench.common\n")
    (tmp_path / "cli.py").write_text("import commands\n")
    got = violations(tmp_path)
    assert "pipeline/a.py:1 imports cache.b, a higher layer" in got
    assert "cache/b.py:2 imports students.c, a higher layer" in got
    assert "students/d.py:2 imports bench.common, which sits above the package" in got
    assert "circle of imports: students.c -> students.d -> students.c" in got
    assert len(got) == 4

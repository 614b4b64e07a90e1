"""The shape of the code: which package may import which, no cycles, one definition of the record's vocabulary.

Read from the source (ast), so an import inside a function counts as much as one at the top."""

import ast
from pathlib import Path

import pytest

from bench import schema

ROOT = Path(__file__).parent.parent
PACKAGES = ("qlora", "bench")


def modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = path
    return out


def imports(path: Path, known: set[str]) -> set[str]:
    """The project's modules that `path` imports (`from bench.render import charts` imports bench.render.charts)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names}
    return {m for m in out if m in known and m.split(".")[0] in PACKAGES}


GRAPH = {name: imports(path, set(modules())) for name, path in modules().items()}


def test_the_engine_never_imports_the_harness():
    reach = {m: sorted(i for i in deps if i.startswith("bench")) for m, deps in GRAPH.items() if m.startswith("qlora")}
    assert not any(reach.values()), {m: d for m, d in reach.items() if d}


def test_the_render_layer_reads_records_and_imports_neither_estimator_nor_engine():
    allowed_qlora = {"qlora.config"}  # the config dataclass, to name a run's settings
    forbidden = {"bench.modelling.estimate", "bench.modelling.records", "bench.measuring.measure",
                 "bench.measuring.ledger", "bench.running"}
    render = {m: deps for m, deps in GRAPH.items() if m.startswith("bench.render")}
    assert len(render) >= 8
    for module, deps in render.items():
        engine = {d for d in deps if d.startswith("qlora") and d not in allowed_qlora}
        assert not engine, f"{module} imports the engine: {engine}"
        bad = {d for d in deps if any(d == f or d.startswith(f + ".") for f in forbidden)}
        assert not bad, f"{module} imports {bad}"


def test_no_import_cycles():
    # Package __init__ files are empty; edges to a package are edges to nothing.
    graph = {m: {d for d in deps if GRAPH.get(d) is not None and d != m} for m, deps in GRAPH.items()}
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(m):
        state[m] = 1
        path.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                pytest.fail("import cycle: " + " -> ".join(path[path.index(d):] + [d]))
            if d not in state:
                visit(d)
        path.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_the_rooms_follow_the_data_flow():
    """measuring and modelling never reach up into running or render; render never into running."""
    order = {"bench.schema": 0, "bench.progress": 0, "bench.recipes": 0, "bench.ladder": 0, "bench.measuring": 1,
             "bench.modelling": 2, "bench.render": 3, "bench.running": 4, "bench.cli": 5}

    def level(m):
        return next((v for k, v in order.items() if m == k or m.startswith(k + ".")), None)

    for m, deps in GRAPH.items():
        if level(m) is None:
            continue
        up = {d for d in deps if level(d) is not None and level(d) > level(m)}
        assert not up, f"{m} reaches up to {up}"


@pytest.mark.parametrize("module, name", [
    ("bench.measuring.ledger", "CATEGORIES"), ("bench.modelling.estimate", "CATEGORIES"),
    ("bench.measuring.record", "SOURCES"), ("bench.measuring.record", "STATUSES"),
    ("bench.measuring.record", "METHODS"), ("bench.render.charts", "METHODS"), ("bench.options", "METHODS"),
    ("bench.running.quality", "METHODS"), ("bench.render.matrix", "GB"), ("bench.modelling.gpus", "MiB"),
])
def test_the_vocabulary_other_modules_use_is_the_schemas_own(module, name):
    import importlib

    assert getattr(importlib.import_module(module), name) is getattr(schema, name)


def test_nothing_spells_the_vocabulary_out_again():
    """No second tuple of the categories, methods, sources or statuses, and no unit literal (2**30 and friends),
    anywhere but bench/schema.py."""
    vocab = {tuple(v) for v in (schema.CATEGORIES, schema.STATIC, schema.METHODS, schema.SOURCES, schema.STATUSES,
                                schema.DEVICE_FIGURES)}
    units = {schema.MiB, schema.GiB, schema.GB}
    found = []
    for name, path in modules().items():
        if name == "bench.schema":
            continue
        tree = ast.parse(path.read_text())
        # The engine's Literal choice lists are the definitions schema takes (METHODS = get_args(Method)).
        literal = {id(e) for n in ast.walk(tree) if isinstance(n, ast.Subscript) and ast.unparse(n.value) == "Literal"
                   for e in ast.walk(n.slice)}
        for node in ast.walk(tree):
            constants = isinstance(node, (ast.Tuple, ast.List)) and all(isinstance(e, ast.Constant) for e in node.elts)
            if constants and id(node) not in literal:
                if tuple(e.value for e in node.elts) in vocab:
                    found.append(f"{path.name}:{node.lineno}: a copy of a vocabulary tuple")
            if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Pow):
                try:
                    value = eval(compile(ast.Expression(node), "<unit>", "eval"))  # noqa: S307 - constants only
                except Exception:  # noqa: BLE001 - not a constant expression
                    continue
                if value in units:
                    found.append(f"{path.name}:{node.lineno}: a unit literal ({ast.unparse(node)})")
    assert not found, "\n".join(found)


def test_no_module_is_over_400_lines():
    long = {name: n for name, path in modules().items() if (n := len(path.read_text().splitlines())) > 400}
    assert not long, long

"""The repository's layers (README, "Files"): each imports only the ones above it, the library files only those
before them in reading order, no module imports itself back through others; and the mutation run (setup.cfg's
[mutmut]) copies every module a test may import."""

import ast
import configparser
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULES = sorted(p.stem for p in ROOT.glob("*.py"))
# README's "Files" table, top to bottom; the library in its reading order
LAYERS = {
    "plumbing": ["weights", "checkpoints", "images", "cli"],
    "library": ["ssd", "mamba2", "vision", "connector", "release", "model", "data", "synthetic"],
    "speed-ups": ["fast_ssd", "ssd_kernel", "fused_step", "fast_decode", "fast_train"],
    "programs": ["train", "run_folder", "distributed", "generate", "evaluate", "convert_release", "benchmark"],
}


def project_imports(source):
    """The project's modules that source imports, at its top or inside a function."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names & set(MODULES)


def import_graph():
    return {m: project_imports((ROOT / f"{m}.py").read_text()) - {m} for m in MODULES}


def a_cycle(graph):
    """One import cycle as a list of modules [a, b, ..., a], or None."""
    done, path = set(), []

    def visit(m):
        if m in path:
            return path[path.index(m):] + [m]
        if m in done:
            return None
        path.append(m)
        for dep in sorted(graph[m]):
            cycle = visit(dep)
            if cycle:
                return cycle
        path.pop()
        done.add(m)
        return None

    return next((c for c in map(visit, sorted(graph)) if c), None)


def test_every_module_has_one_layer():
    listed = [m for layer in LAYERS.values() for m in layer]
    assert sorted(listed) == MODULES


def test_each_layer_imports_only_the_layers_above_it():
    """README's layers run one way: plumbing, the library, the speed-ups, the programs; a speed-up never reaches
    the library through an import there, only from outside."""
    graph, above = import_graph(), set()
    for name, layer in LAYERS.items():
        for m in layer:
            assert graph[m] <= above | set(layer), f"{m}.py ({name}) imports {sorted(graph[m] - above - set(layer))}"
        above |= set(layer)


def test_the_library_reads_in_order():
    """Each library file imports only the library files before it in README's reading order."""
    graph, library = import_graph(), LAYERS["library"]
    for i, m in enumerate(library):
        later = graph[m] & set(library[i:])
        assert not later, f"{m}.py imports {sorted(later)}, which come after it"


def test_no_import_cycle():
    assert a_cycle(import_graph()) is None


@pytest.mark.parametrize("graph, cycle", [
    ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, ["a", "b", "c", "a"]),
    ({"a": {"b"}, "b": set(), "c": {"c"}}, ["c", "c"]),
    ({"a": {"b", "c"}, "b": {"c"}, "c": set()}, None),
])
def test_a_cycle_finds_a_cycle_and_only_a_cycle(graph, cycle):
    assert a_cycle(graph) == cycle


def test_project_imports_reads_imports_anywhere_in_a_file():
    source = ("import os, ssd\nfrom mamba2 import Mamba2Mixer\n"
              "def f():\n    import fast_ssd.x\n    from . import model\n")
    assert project_imports(source) == {"ssd", "mamba2", "fast_ssd"}


def test_the_mutation_run_copies_every_module():
    """mutmut runs the tests in a copy holding only source_paths: a module missing there fails every test that
    imports it."""
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    copied = {Path(p).stem for p in config["mutmut"]["source_paths"].split()}
    assert copied == set(MODULES)

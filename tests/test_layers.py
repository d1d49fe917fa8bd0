"""The import rule of DESIGN.md: a module never imports from a higher layer, not even
inside a function."""
import ast

from conftest import ROOT

LAYER = {
    "utils": 0, "config": 0, "launch": 0, "comm": 1, "ops": 1, "_C": 1, "linalg": 2, "nn": 2, "data": 2,
    "optim": 3, "sync": 3, "multilevel": 4, "mgrit": 4, "pipeline": 4, "planner": 4,
    "train": 5, "io": 5, "search": 5, "cli": 6, "__main__": 6,
}
# The order of docs/architecture.md: a package imports only packages before it (so within
# a layer too: comm builds on ops, optim on sync, pipeline on mgrit, planner on both,
# train on io).
ORDER = ["utils", "launch", "config", "_C", "ops", "comm", "linalg", "nn", "data", "sync",
         "optim", "mgrit", "multilevel", "pipeline", "planner", "io", "train", "search", "cli",
         "__main__"]


def _imports(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module
            if node.module == "mltrain":
                for a in node.names:
                    yield f"mltrain.{a.name}"


def _modules():
    """(path relative to the package, top-level package, imported module names) of every
    module of mltrain but its __init__."""
    pkg = ROOT / "mltrain"
    for path in pkg.rglob("*.py"):
        rel = path.relative_to(pkg).with_suffix("")
        if rel.parts[0] != "__init__":
            yield rel, rel.parts[0], [m.split(".") for m in _imports(ast.parse(path.read_text()))]


def test_no_upward_imports():
    bad = []
    for rel, top, mods in _modules():
        mine = LAYER[top]
        for parts in mods:
            mod = ".".join(parts)
            if parts[0] == "mltrain" and len(parts) > 1 and parts[1] in LAYER:
                if LAYER[parts[1]] > mine:
                    bad.append(f"{rel} (layer {mine}) imports {mod} (layer {LAYER[parts[1]]})")
            if parts[0] == "petsc4py" and ".".join(rel.parts) != "linalg.petsc":
                bad.append(f"{rel} imports petsc4py (only linalg/petsc.py may)")
            if parts[0] == "mpi4py" and top in ("utils", "config", "launch", "ops", "nn"):
                bad.append(f"{rel} imports mpi4py (layer {top} must not communicate)")
    assert not bad, "\n".join(bad)


def test_packages_import_only_earlier_ones():
    assert sorted(ORDER) == sorted(LAYER)
    assert [LAYER[p] for p in ORDER] == sorted(LAYER[p] for p in ORDER)  # layers in order
    bad = []
    for rel, top, mods in _modules():
        for parts in mods:
            if parts[0] == "mltrain" and len(parts) > 1 and parts[1] in LAYER \
                    and parts[1] != top and ORDER.index(parts[1]) > ORDER.index(top):
                bad.append(f"{rel} imports {'.'.join(parts)}, which comes after {top}")
    assert not bad, "\n".join(bad)


def test_collective_docstrings_name_their_communicator():
    """DESIGN.md: a docstring says whether a function is collective and on which
    communicator; a bare "Collective." says only half."""
    import re

    bare = [f"{path.relative_to(ROOT)}:{n}" for path in (ROOT / "mltrain").rglob("*.py")
            for n, line in enumerate(path.read_text().splitlines(), 1)
            if re.search(r"\bCollective\.(\s|\"|$)", line)]
    assert not bare, "\n".join(bare)

"""Every training path is device-agnostic by construction (issue 20), checked on any machine.

CI has no GPU, so the GPU parity tests are not collected there; this audit is what keeps a
CPU-only change from putting a tensor in host memory on a path that trains on a GPU. The rule:
in the training layers, a call that makes a tensor (``torch.zeros``, ``torch.tensor``,
``torch.from_numpy``, ...) either says where it lives (its source mentions ``device``:
``device=x.device``, ``.to(device)``) or carries a ``# host:`` comment saying why host memory
is right there (an MPI scalar, a PETSc vector, a CPU kernel's reference); and ``.numpy()``
is taken of ``.cpu()`` or of a tensor annotated ``# host:``.
"""
import ast

from conftest import ROOT

FACTORIES = {"zeros", "empty", "ones", "full", "arange", "tensor", "randn", "rand", "randint",
             "eye", "randperm", "linspace", "as_tensor", "from_numpy", "zeros_like_host"}
# Layers that never hold training tensors: configuration, launching, the data files (read
# into host memory by design, moved to the device by the trainer), the CLI's host-side tools
# and the search controller (bytes and JSON).
SKIP = {"config", "launch", "utils", "data", "cli", "search", "__main__.py", "_C"}


def _source_lines(path):
    return path.read_text().splitlines()


def _offences(path):
    lines = _source_lines(path)
    tree = ast.parse("\n".join(lines))
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
            continue
        span = "\n".join(lines[node.lineno - 1:node.end_lineno])
        name = node.func.attr
        f = node.func.value
        if isinstance(f, ast.Name) and f.id == "torch" and name in FACTORIES:
            if "device" in span or "# host:" in span:
                continue
            yield node.lineno, f"torch.{name}(...) without a device or a '# host:' reason"
        elif name == "numpy" and not node.args:
            inner = f.func.attr if isinstance(f, ast.Call) and isinstance(f.func, ast.Attribute) else ""
            if inner == "cpu" or "# host:" in span:
                continue
            yield node.lineno, ".numpy() of a tensor that may live on a GPU (take .cpu() first)"


def test_tensor_factories_say_where_they_live():
    pkg = ROOT / "mltrain"
    bad = []
    for path in sorted(pkg.rglob("*.py")):
        rel = path.relative_to(pkg)
        if rel.parts[0] in SKIP:
            continue
        for line, what in _offences(path):
            bad.append(f"mltrain/{rel}:{line}: {what}")
    assert not bad, "device-agnostic paths (issue 20):\n" + "\n".join(bad)

"""Static guard: method code creates tensors on the model's device.

A tensor factory called without ``device=`` lands on the CPU, which goes unnoticed on a CPU-only CI and fails
(or silently copies) on a GPU: mixed-device arithmetic raises, and NCCL rejects CPU tensors in collectives.
This test parses the step code with ``ast`` and fails on every ``torch.<factory>(...)`` call without a
``device=`` keyword; ``*_like`` factories and ``tensor.new_*`` follow their argument and pass. The few
deliberate CPU tensors are listed in ``ALLOWED`` with the reason.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from liftkit.solvers import resolve_solve_dtype, solve_dtype_like

SRC = Path(__file__).resolve().parents[1] / "src" / "liftkit"

#: files whose code runs inside ``Method.step``
SCANNED = [*sorted((SRC / "methods").rglob("*.py")), *sorted((SRC / "optim").rglob("*.py")), SRC / "solvers.py",
           SRC / "activations.py"]

#: paths left out of the scan (none: every method module is checked)
EXCLUDED_PREFIXES: tuple[str, ...] = ()

FACTORIES = frozenset({
    "zeros", "ones", "empty", "full", "tensor", "eye", "arange", "linspace", "logspace", "rand", "randn",
    "randint", "randperm", "as_tensor", "scalar_tensor", "empty_strided", "tril_indices", "triu_indices",
    "normal", "bernoulli", "sparse_coo_tensor",
})

#: "path:function" -> why a CPU tensor is intended there
ALLOWED = {
    # Seeded start vectors of power iterations come from a private CPU generator, so the estimate is the same
    # on every device; the vector is moved to the weights' device in the same expression.
    "solvers.py:_start_vector": "CPU generator for device-independent reproducibility, then .to(device)",
    "methods/lpom_kernels.py:warm_power": "CPU generator for device-independent reproducibility, then .to(device)",
    "methods/lpom_shards.py:row_spectral_norm": "CPU generator for device-independent reproducibility, then .to()",
    # Seeded shuffles of Python lists of blocks: the permutation becomes a list at once (.tolist()).
    "methods/lpom_parallel.py:_simulate": "host-side permutation of a Python list of blocks",
    # li2 accepts Python numbers too; a tensor argument passes through as_tensor unchanged, device included.
    "activations.py:li2": "as_tensor of a tensor keeps its device; only Python numbers land on the CPU",
}


def _relative(path: Path) -> str:
    return path.relative_to(SRC).as_posix()


def _is_torch_factory(call: ast.Call) -> str | None:
    """The factory's name when ``call`` is ``torch.<factory>(...)`` (also ``torch.tensor`` etc.), else None."""
    f = call.func
    if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) and f.value.id == "torch":
        return f.attr if f.attr in FACTORIES else None
    return None


def _has_device(call: ast.Call) -> bool:
    # ``**kwargs`` may carry the device: it cannot be checked statically, so it needs an ALLOWED entry too
    return any(kw.arg == "device" for kw in call.keywords)


def offenders(path: Path) -> list[str]:
    """``path:function:line factory`` for every factory call without ``device=`` in ``path``."""
    return offenders_in(path.read_text(encoding="utf-8"), _relative(path))


def offenders_in(source: str, rel: str) -> list[str]:
    """:func:`offenders` of source text, reported as file ``rel``."""
    tree = ast.parse(source, filename=rel)
    found: list[str] = []

    def visit(node: ast.AST, function: str) -> None:
        for child in ast.iter_child_nodes(node):
            name = function
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                name = child.name if function == "<module>" else function  # nested helpers: their outer function
            if isinstance(child, ast.Call):
                factory = _is_torch_factory(child)
                if factory is not None and not _has_device(child):
                    found.append(f"{rel}:{name}:{child.lineno} torch.{factory}")
            visit(child, name)

    visit(tree, "<module>")
    return found


def _scanned() -> list[Path]:
    return [p for p in SCANNED if not _relative(p).startswith(EXCLUDED_PREFIXES)]


def _allowed(entry: str) -> bool:
    path, function, _ = entry.split(" ")[0].split(":")
    return f"{path}:{function}" in ALLOWED


@pytest.mark.parametrize("path", _scanned(), ids=_relative)
def test_tensor_factories_in_step_code_name_a_device(path: Path):
    bad = [e for e in offenders(path) if not _allowed(e)]
    assert not bad, (
        "tensor factories without device= (pass device=<the model's or an input's device>, use *_like / "
        "tensor.new_*, or add a commented ALLOWED entry):\n  " + "\n  ".join(bad)
    )


def test_allowlist_entries_are_still_needed():
    used = {":".join(e.split(" ")[0].split(":")[:2]) for p in _scanned() for e in offenders(p)}
    stale = sorted(set(ALLOWED) - used)
    assert not stale, f"ALLOWED entries that no longer match an offending call: {stale}"


def test_the_guard_catches_a_factory_without_device():
    code = (
        "import torch\n"
        "def f(x):\n"
        "    a = torch.zeros(3, dtype=x.dtype)\n"
        "    b = torch.zeros(3, dtype=x.dtype, device=x.device)\n"
        "    c = torch.zeros_like(x)\n"
        "    d = x.new_zeros(3)\n"
        "    def inner():\n"
        "        return torch.tensor([1.0])\n"
        "    return a, b, c, d, inner\n"
    )
    assert offenders_in(code, "m.py") == ["m.py:f:3 torch.zeros", "m.py:f:8 torch.tensor"]


def test_solve_dtype_auto_is_float64_on_cpu_and_float32_on_cuda():
    assert resolve_solve_dtype("auto", "cpu") is torch.float64
    assert resolve_solve_dtype("auto", torch.device("cuda", 0)) is torch.float32  # no CUDA needed to resolve
    assert resolve_solve_dtype("float32", "cpu") is torch.float32
    assert resolve_solve_dtype("float64", "cuda") is torch.float64
    with pytest.raises(ValueError, match="solve_dtype must be one of float64, float32, auto"):
        resolve_solve_dtype("half", "cpu")


def test_solve_dtype_like_follows_a_float32_or_float64_input_under_auto():
    assert solve_dtype_like("auto", torch.zeros(2, dtype=torch.float32)) is torch.float32
    assert solve_dtype_like("auto", torch.zeros(2, dtype=torch.float64)) is torch.float64
    assert solve_dtype_like("auto", torch.zeros(2, dtype=torch.bfloat16)) is torch.float64  # as resolve_solve_dtype
    assert solve_dtype_like("float64", torch.zeros(2, dtype=torch.float32)) is torch.float64
    with pytest.raises(ValueError, match="solve_dtype must be one of"):
        solve_dtype_like("half", torch.zeros(2))

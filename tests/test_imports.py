"""Import boundaries (DESIGN.md): Ray and DeepSpeed stay at the edges."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "sft_dist"
MAY_IMPORT = {
    "ray": {"launcher.py", "tuning.py", "runtime.py"},
    "deepspeed": {"engine.py", "checkpoint.py", "export.py", "safe_loading.py"},
}
NO_DISTRIBUTED = ["config.py", "model.py", "adapters.py", "data"]


def imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


def modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("library", sorted(MAY_IMPORT))
def test_only_the_edge_modules_import(library):
    offenders = [str(p.relative_to(PACKAGE)) for p in modules()
                 if library in imported_roots(p) and p.name not in MAY_IMPORT[library]]
    assert offenders == []


def uses_torch_distributed(path: Path) -> bool:
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Attribute) and node.attr == "distributed" and getattr(node.value, "id", "") == "torch":
            return True
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
        if isinstance(node, ast.ImportFrom):
            names = [node.module or ""]
        if any(n.startswith("torch.distributed") for n in names):
            return True
    return False


def test_config_data_and_model_never_touch_torch_distributed():
    for entry in NO_DISTRIBUTED:
        for path in (PACKAGE / entry).rglob("*.py") if (PACKAGE / entry).is_dir() else [PACKAGE / entry]:
            if path.exists():
                assert not uses_torch_distributed(path), path
    assert uses_torch_distributed(PACKAGE / "runtime.py")  # the check itself works


def test_config_imports_no_torch():
    assert imported_roots(PACKAGE / "config.py").isdisjoint({"torch", "ray", "deepspeed"})


def test_the_boundary_check_sees_imports():
    # Guards the guard: the parser must find the imports the launcher really has.
    assert "ray" in imported_roots(PACKAGE / "launcher.py")


def sft_dist_modules_imported(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module == "sft_dist":
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("sft_dist."):
            names.add(node.module.split(".")[1])
    return names


def test_the_driver_reads_checkpoints_without_deepspeed():
    """The storage side of checkpoints (sft_dist.checkpoints) is the driver's; the DeepSpeed side is the workers'."""
    for module in ("driver.py", "launcher.py", "checkpoints.py"):
        assert "checkpoint" not in sft_dist_modules_imported(PACKAGE / module), module
    assert "checkpoints" in sft_dist_modules_imported(PACKAGE / "driver.py")  # the check itself sees imports

"""Import boundaries (DESIGN.md): Ray and DeepSpeed stay at the edges."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import subprocess_env

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


def configure_after(first: str, use_gpu: bool) -> subprocess.CompletedProcess:
    """A fresh process that runs `first`, then runtime.configure_worker(use_gpu), and prints the
    accelerator DeepSpeed ended up with."""
    script = (f"{first}\nfrom sft_dist import runtime\nruntime.configure_worker(use_gpu={use_gpu}, threads=1)\n"
              "from deepspeed.accelerator import get_accelerator\nprint('accelerator:', get_accelerator().device_name())")
    env = {k: v for k, v in subprocess_env().items() if k != "DS_ACCELERATOR"}
    return subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)


def test_deepspeed_imported_before_configure_worker_with_another_accelerator_fails_clearly():
    """DeepSpeed picks its accelerator once, on import: a worker that imported it before configure_worker
    would train on the wrong device; it must stop with the import-order error instead. (On this CPU
    machine DeepSpeed's own probe picks cpu, so the mismatch is a GPU worker's.)"""
    done = configure_after("import deepspeed", use_gpu=True)
    assert done.returncode == 1, done.stdout + done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("sft_dist.runtime.ImportOrderError: DeepSpeed was imported before "
                           "runtime.configure_worker and chose the cpu accelerator"), done.stderr[-2000:]


def test_configure_worker_first_gives_deepspeed_the_cpu_accelerator():
    done = configure_after("", use_gpu=False)
    assert done.returncode == 0 and "accelerator: cpu" in done.stdout, done.stderr[-2000:]
    assert "Setting accelerator to CPU" not in done.stdout + done.stderr  # DS_ACCELERATOR chose, not its probe


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

"""Import boundaries (docs/DESIGN.md): Ray and DeepSpeed stay at the edges, and the package's folders say
which side of the Ray boundary a module runs on (driver/ never reaches into a worker's loop; the model,
data and task code imports neither side)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import subprocess_env

PACKAGE = Path(__file__).resolve().parents[1] / "sft_dist"
MAY_IMPORT = {
    "ray": {"driver/launcher.py", "driver/capacity.py", "driver/tuning.py", "worker/runtime.py"},
    "deepspeed": {"worker/engine.py", "worker/checkpoint.py", "tools/export.py", "safe_loading.py"},
}
NO_DISTRIBUTED = ["config.py", "modeling", "data", "tasks"]
# Which of the package's folders a folder's modules may import (top-level modules are shared by all).
MAY_REACH = {
    "driver": {"driver", "data", "tasks", "modeling", "tools", "worker"},  # worker: only its entry points
    "worker": {"worker", "data", "tasks", "modeling", "tools"},  # tools: lr_find's divergence rule
    "tools": {"tools", "worker", "driver", "data", "tasks", "modeling"},
    "modeling": {"modeling", "tasks", "data"},  # data: the label padding id
    "tasks": {"tasks", "data", "modeling"},
    "data": {"data", "tasks"},
}
# What the driver may name of the worker side: the job it hands over and the entry points it starts
# (runtime: Ray's per-worker function, the in-process context; train.run_job for --no-ray; preflight's
# one-line summary of the workers' check-in event).
WORKER_ENTRY_POINTS = {"worker", "worker.runtime", "worker.train", "worker.preflight"}


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
                 if library in imported_roots(p) and str(p.relative_to(PACKAGE)) not in MAY_IMPORT[library]]
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
    assert uses_torch_distributed(PACKAGE / "worker" / "runtime.py")  # the check itself works


def test_config_imports_no_torch():
    assert imported_roots(PACKAGE / "config.py").isdisjoint({"torch", "ray", "deepspeed"})


def test_the_boundary_check_sees_imports():
    # Guards the guard: the parser must find the imports the launcher really has.
    assert "ray" in imported_roots(PACKAGE / "driver" / "launcher.py")


def configure_after(first: str, use_gpu: bool) -> subprocess.CompletedProcess:
    """A fresh process that runs `first`, then runtime.configure_worker(use_gpu), and prints the
    accelerator DeepSpeed ended up with."""
    script = (f"{first}\nfrom sft_dist.worker import runtime\nruntime.configure_worker(use_gpu={use_gpu}, threads=1)\n"
              "from deepspeed.accelerator import get_accelerator\n"
              "print('accelerator:', get_accelerator().device_name())")
    env = {k: v for k, v in subprocess_env().items() if k != "DS_ACCELERATOR"}
    return subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)


def test_deepspeed_imported_before_configure_worker_with_another_accelerator_fails_clearly():
    """DeepSpeed picks its accelerator once, on import: a worker that imported it before configure_worker
    would train on the wrong device; it must stop with the import-order error instead. (On this CPU
    machine DeepSpeed's own probe picks cpu, so the mismatch is a GPU worker's.)"""
    done = configure_after("import deepspeed", use_gpu=True)
    assert done.returncode == 1, done.stdout + done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("sft_dist.worker.runtime.ImportOrderError: DeepSpeed was imported before "
                           "runtime.configure_worker and chose the cpu accelerator"), done.stderr[-2000:]


def test_configure_worker_first_gives_deepspeed_the_cpu_accelerator():
    done = configure_after("", use_gpu=False)
    assert done.returncode == 0 and "accelerator: cpu" in done.stdout, done.stderr[-2000:]
    assert "Setting accelerator to CPU" not in done.stdout + done.stderr  # DS_ACCELERATOR chose, not its probe


def sft_dist_modules_imported(path: Path) -> set[str]:
    """The sft_dist modules and packages `path` imports, dotted below sft_dist (e.g. worker.checkpoint)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and (
                node.module == "sft_dist" or node.module.startswith("sft_dist.")):
            below = node.module.removeprefix("sft_dist").lstrip(".")
            names |= {f"{below}.{alias.name}".lstrip(".") for alias in node.names}
            if below:
                names.add(below)
    return names


def test_each_folder_imports_only_the_folders_on_its_side():
    offenders = []
    for path in modules():
        folder = path.relative_to(PACKAGE).parts[0]
        if folder not in MAY_REACH:
            continue
        reached = {name.split(".")[0] for name in sft_dist_modules_imported(path)}
        offenders += [f"{path.relative_to(PACKAGE)} -> {r}" for r in reached & set(MAY_REACH) - MAY_REACH[folder]]
        if folder == "driver":
            imported = sft_dist_modules_imported(path)
            worker_modules = {".".join(n.split(".")[:2]) for n in imported if n.startswith("worker")}
            offenders += [f"{path.relative_to(PACKAGE)} -> {m}" for m in worker_modules - WORKER_ENTRY_POINTS]
    assert offenders == []
    assert "worker" in {n.split(".")[0] for n in sft_dist_modules_imported(PACKAGE / "driver" / "commands.py")}


def test_the_driver_reads_checkpoints_without_deepspeed():
    """The storage side of checkpoints (sft_dist.checkpoints) is the driver's; the DeepSpeed side is the workers'."""
    for module in ("driver/commands.py", "driver/launcher.py", "driver/launch_path.py", "checkpoints.py"):
        assert "worker.checkpoint" not in sft_dist_modules_imported(PACKAGE / module), module
    assert "checkpoints" in sft_dist_modules_imported(PACKAGE / "driver" / "commands.py")  # the check sees imports

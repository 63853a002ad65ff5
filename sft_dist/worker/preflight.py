"""Preflight: before any weights load, every worker checks in (host, device, free memory, library
versions), the workers run one small all-reduce, and each writes a probe file to the checkpoint storage
that every other worker reads back. A failure or a version mismatch stops the run on every rank with
one message naming the workers concerned, seconds after start instead of after minutes of loading.
"""

from __future__ import annotations

import os
import platform
import socket
import uuid
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import psutil
import torch

from sft_dist.config import RunConfig
from sft_dist.storage import Location, StorageError
from sft_dist.worker.runtime import RunContext, all_gather, all_reduce_sum

# What must be identical on every worker: a different DeepSpeed or torch on one node can change
# checkpoint formats or collectives in ways that fail late and obscurely.
PACKAGES = ("torch", "deepspeed", "transformers", "peft", "ray")
PROBE_DIR = ".preflight"


class PreflightError(RuntimeError):
    pass


def check(ctx: RunContext, cfg: RunConfig) -> None:
    """Check in every worker, or raise PreflightError on every rank alike.

    Collective: every rank calls it once, at the same point (all_gather twice, all_reduce once).
    """
    probe_dir = ctx.storage.join(PROBE_DIR)
    report = {**worker_report(ctx), "probe": f"rank{ctx.rank}-{uuid.uuid4().hex}"}
    report["storage_error"] = write_probe(probe_dir.join(report["probe"]))
    reports = all_gather(report)  # also the barrier: every probe is written before anyone reads
    read_errors = all_gather(read_probes(probe_dir, reports))
    collective_ok = all_reduce_sum(torch.ones(1, device=ctx.device)).item() == ctx.world_size
    if ctx.rank == 0:  # after the second gather: nobody reads the probes any more
        remove_probes(probe_dir)
    problems = find_problems(reports, read_errors, str(ctx.storage.parent))
    if not collective_ok:
        problems.append(f"the test all-reduce over {ctx.world_size} workers returned a wrong sum")
    if problems:
        raise PreflightError("preflight: " + "; ".join(problems))
    ctx.emit({"step": 0, "event": "preflight", "workers": [
        {k: v for k, v in r.items() if k not in ("probe", "storage_error")} for r in reports]})


def worker_report(ctx: RunContext) -> dict[str, Any]:
    """Who this worker is and what it runs: host, device, free memory, library versions."""
    if ctx.device.type == "cuda":
        free_bytes = torch.cuda.mem_get_info(ctx.device)[0]
        device = f"{ctx.device} {torch.cuda.get_device_name(ctx.device)}"
    else:
        free_bytes = psutil.virtual_memory().available
        device = "cpu"
    return {"rank": ctx.rank, "host": socket.gethostname(), "pid": os.getpid(), "device": device,
            "free_memory_gib": round(free_bytes / 2**30, 2), "python": platform.python_version(),
            "versions": {package: package_version(package) for package in PACKAGES}}


def package_version(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def write_probe(probe: Location) -> str | None:
    """Write this worker's probe file (its own name as content); the error, if any, as text."""
    try:
        probe.write_text(probe.name)
    except StorageError as err:
        return str(err)
    return None


def read_probes(probe_dir: Location, reports: list[dict[str, Any]]) -> list[str]:
    """Read back every worker's probe: a path that is each node's own disk fails here, not at resume."""
    errors = []
    for report in reports:
        if report["storage_error"]:
            continue  # the writer reports its own failure
        try:
            ok = probe_dir.join(report["probe"]).read_text() == report["probe"]
        except StorageError:
            ok = False
        if not ok:
            errors.append(f"cannot read back rank {report['rank']}'s probe")
    return errors


def remove_probes(probe_dir: Location) -> None:
    try:
        probe_dir.delete()
    except StorageError:
        pass  # already gone: the probes only ever served this check


def find_problems(reports: list[dict[str, Any]], read_errors: list[list[str]], storage: str) -> list[str]:
    """Every rank computes the same list from the same gathered data, so all stop, or none does."""
    problems = []
    reference = reports[0]
    for report in reports:
        who = f"rank {report['rank']} on {report['host']}"
        if report["storage_error"]:
            problems.append(f"{who} cannot write to the checkpoint storage {storage}: {report['storage_error']}")
        for package in PACKAGES:
            mine, theirs = report["versions"][package], reference["versions"][package]
            if mine != theirs:
                problems.append(f"{who} has {package} {mine}, rank 0 on {reference['host']} has {theirs}")
        if report["python"] != reference["python"]:
            problems.append(f"{who} runs Python {report['python']}, rank 0 runs {reference['python']}")
    for report, errors in zip(reports, read_errors):
        for error in errors:
            problems.append(f"rank {report['rank']} on {report['host']} {error} from {storage} "
                            "(is it the same shared storage on every node?)")
    return problems


def summary(reports: list[dict[str, Any]]) -> str:
    """The check-in as the driver prints it: one line for the versions, one per worker."""
    versions = ", ".join(f"{p} {v}" for p, v in reports[0]["versions"].items())
    lines = [f"preflight: {len(reports)} workers checked in ({versions})"]
    lines += [f"  rank {r['rank']}: {r['host']} pid {r['pid']}, {r['device']}, {r['free_memory_gib']} GiB free"
              for r in reports]
    return "\n".join(lines)

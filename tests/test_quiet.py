"""A clean log (sft_dist.quiet): a real Ray run prints its own lines and none of the library noise that
sft_dist silences; and, filter by filter, proof that upstream still emits what is silenced. When one of
the `upstream_still_emits` tests fails, that library stopped emitting the line: remove its filter."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from sft_dist import quiet

from conftest import REPO, subprocess_env

# Lines (or parts) that each filter keeps out of a run's output.
NOISE = {
    "ray_log_colours": "\x1b[",
    "ray_preemption_watcher_restart_warning": "Actor with class name: 'PreemptionWatcher'",
    "ray_train_info_lines": "Started training worker group",
    "ray_train_process_group_line": "Setting up process group for",
    "ray_token_authentication_notice": "Token authentication is enabled for this Ray cluster",
    "ray_train_report_line": "Reporting training result",
    "deepspeed_cpu_fallback_warning": "Setting accelerator to CPU",
    "deepspeed_shm_comm_built": "deepspeed_shm_comm_op built successfully",
    "torch_all_gather_into_tensor_deprecation": "all_gather_into_tensor` is deprecated",
    "torch_reduce_scatter_tensor_deprecation": "reduce_scatter_tensor` is deprecated",
    "transformers_loading_progress_bar": "Loading weights",
    "whisper_generate_config_notice": "Passing `generation_config` together with generation-related arguments",
    "generate_length_notice": "seem to have been set. `max_new_tokens` will take precedence",
}


@pytest.fixture(scope="module")
def probes() -> dict[str, dict[str, str]]:
    """What each library prints when made to (tests/fixtures/noise_probe.py), without and with the filters."""
    found = {}
    # Without DS_ACCELERATOR, which an in-process run earlier in the session may have set: DeepSpeed warns
    # only when it detects the accelerator itself, as a user's fresh process does.
    env = {k: v for k, v in subprocess_env().items() if k != "DS_ACCELERATOR"}
    for name, show_all in (("upstream", "1"), ("quiet", "0")):
        result = subprocess.run([sys.executable, str(REPO / "tests" / "fixtures" / "noise_probe.py")], cwd=REPO,
                                env={**env, quiet.SHOW_ALL: show_all}, capture_output=True, text=True, timeout=180)
        assert result.returncode == 0, result.stderr[-3000:]
        found[name] = json.loads(result.stdout.strip().splitlines()[-1])
    return found


PROBED = ["deepspeed_cpu_fallback_warning", "torch_all_gather_into_tensor_deprecation",
          "torch_reduce_scatter_tensor_deprecation", "deepspeed_shm_comm_built", "transformers_loading_progress_bar",
          "whisper_generate_config_notice", "generate_length_notice"]


@pytest.mark.parametrize("name", PROBED)
def test_upstream_still_emits_what_the_filter_silences_and_the_filter_removes_it(name, probes):
    assert NOISE[name] in probes["upstream"][name], probes["upstream"][name]
    assert probes["quiet"][name] == ""


def raw_logs(session_dir: Path, pattern: str) -> str:
    return "".join(p.read_text(errors="replace") for p in sorted((session_dir / "logs").rglob(pattern))
                   if p.is_file() and p.stat().st_size < 50_000_000)


def test_a_ray_run_prints_its_own_lines_and_none_of_the_known_noise(ray_cluster, stopped_ray_run):
    """A short real run on the session's Ray (2 workers, ZeRO-2: all-gathers at every step; stopped with a
    checkpoint), its output as the driver shows it (Ray forwards the workers' lines), and the session's
    raw logs: every Ray process's own output, before the driver filters it."""
    out, err = stopped_ray_run.out, stopped_ray_run.err
    for name, line in NOISE.items():
        assert line not in out + err, f"{name}: {line!r} in the output:\n{out}{err}"
    for own in ("run folder:", "preflight: 2 workers checked in", "setup: 2 workers, ZeRO-2", "train step 2/1000",
                "eval  step 0: eval_loss", "SIGTERM: finishing the current step", "stopped at step"):
        assert own in out, f"{own!r} missing:\n{out}{err}"
    # Upstream still emits what the driver skips: when one of these fails, remove that filter.
    assert "Actor with class name: 'PreemptionWatcher'" in raw_logs(ray_cluster, "*.err")  # Ray's core worker
    assert "Started training worker group" in raw_logs(ray_cluster, "ray-train-sys-controller-*.log")  # all levels
    assert "Reporting training result" in raw_logs(ray_cluster, "ray-train-app-worker-*.log")  # the stop's checkpoint


def test_the_first_start_says_it_builds_deepspeeds_ops_once(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    line = quiet.deepspeed_op_builds(use_gpu=False, offload_optimizer=False, local_rank=0)
    assert line == (f"building DeepSpeed's deepspeed_shm_comm and fused_adam ops for this environment (once, "
                    f"about a minute); later starts load them from {tmp_path}")
    assert capsys.readouterr().out == line + "\n"
    for op in ("deepspeed_shm_comm", "fused_adam"):
        (tmp_path / op).mkdir()
        (tmp_path / op / f"{op}.so").write_bytes(b"")
    assert quiet.deepspeed_op_builds(use_gpu=False, offload_optimizer=False, local_rank=0) is None
    assert "cpu_adam op" in quiet.deepspeed_op_builds(use_gpu=False, offload_optimizer=True, local_rank=0)
    assert quiet.deepspeed_op_builds(use_gpu=False, offload_optimizer=True, local_rank=1) is None  # once a node


def test_the_op_build_folder_is_where_torch_builds_deepspeeds_ops(tmp_path, monkeypatch):
    """The announcement looks where torch's JIT build puts an op: TORCH_EXTENSIONS_DIR/NAME."""
    from torch.utils.cpp_extension import _get_build_directory

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert _get_build_directory("fused_adam", verbose=False) == str(tmp_path / "fused_adam")

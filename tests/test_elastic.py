"""Elastic runs (`ray.num_workers: [MIN, MAX]`): the global batch is fixed and grad_accum follows the world
size, so a run that loses a node, trains on at fewer workers and grows back follows the uninterrupted
run's loss curve.

The drills run on a real two-node cluster of this machine (cluster/local/start.sh: a head and a worker
node of one CPU each, so each node holds one worker). Stopping the worker node's `ray start` ends its
raylet and the worker on it; Ray Train restarts the group on the one node left; starting the node again
lets Ray's elastic policy grow the group back. The cluster has its own ports and temp dir and its
address reaches only the driver subprocesses here, so it never meets the session's in-process Ray.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import zero_moments

from sft_dist import config as config_lib
from sft_dist.errors import UserError

from conftest import (
    BASELINE_STEPS,
    REPO,
    TINY_CONFIG,
    eval_losses,
    learning_rates,
    read_events,
    subprocess_env,
    train_losses,
    train_tiny,
)

pytestmark = pytest.mark.timeout(900)

PORT = 6450
BIN = Path(sys.executable).parent
ELASTIC = ["ray.num_workers=[1,2]", "train.grad_accum=", "train.global_batch_size=8"]
DRILL_STEPS = 60


def test_grad_accum_follows_the_world_size_and_keeps_the_global_batch():
    cfg = config_lib.load(TINY_CONFIG, ELASTIC)
    assert cfg.ray.num_workers == (1, 2) and cfg.global_batch_size() == 8
    assert [cfg.grad_accum_at(w) for w in (1, 2)] == [2, 1]  # micro-batch 4: 4 x 2 x 1 = 4 x 1 x 2
    saved = config_lib.RunConfig.model_validate(cfg.model_dump(mode="json"))  # as a worker re-validates it
    assert saved.grad_accum_at(1) == 2 and saved.ray.num_workers == (1, 2)


@pytest.mark.parametrize("overrides, words", [
    (["ray.num_workers=[1,3]"], "includes 3 worker(s), which cannot keep train.global_batch_size 8 "
                                "(train.micro_batch_size 4 x grad_accum x workers); the world sizes that keep it: "
                                "1, 2"),
    (["ray.num_workers=[2,1]"], "0 < MIN <= MAX"),
    (["ray.num_workers=[1,2]", "train.grad_accum=2"], "train.global_batch_size: 8 but"),
])
def test_a_range_that_cannot_keep_the_global_batch_is_refused_naming_the_sizes_that_can(overrides, words):
    with pytest.raises(UserError) as refused:
        config_lib.load(TINY_CONFIG, [*ELASTIC, *overrides])
    assert words in str(refused.value)


def test_the_cli_refuses_such_a_range_in_one_line_before_ray(tmp_path):
    env = {**subprocess_env(), "RAY_ADDRESS": "127.0.0.1:1"}  # unreachable: touching Ray would fail otherwise
    args = [a for o in [f"output_dir={tmp_path}", *ELASTIC, "ray.num_workers=[1,3]"] for a in ("--set", o)]
    result = subprocess.run([sys.executable, "-m", "sft_dist", "train", str(TINY_CONFIG), *args], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "ray.num_workers: [1, 3] includes 3 worker(s)" in lines[0], result.stderr
    assert "the world sizes that keep it: 1, 2;" in lines[0] and not list(tmp_path.iterdir())


def test_one_worker_follows_the_two_worker_trajectory(zero2_run, tmp_path):
    """The exactness core, without Ray: one process of the elastic config (grad_accum 2) against the
    session's uninterrupted 2-worker run (grad_accum 1) over the same global batches."""
    one = train_tiny(tmp_path, f"train.max_steps={BASELINE_STEPS}", *ELASTIC, extra_args=("--no-ray",))
    assert [e["world_size"] for e in read_events(one) if "loss" in e] == [1] * BASELINE_STEPS
    assert train_losses(one) == pytest.approx(train_losses(zero2_run), rel=1e-4)
    assert eval_losses(one) == pytest.approx(eval_losses(zero2_run), rel=1e-4)


def zero_group(world_size: int, tmp_path: Path, config: Path, train_dir: str, restore: str, steps: int,
                name: str) -> dict:
    """Run tests/zero_moments.py as a process group of `world_size` (torchrun's environment); returns the
    Adam moments and fp32 weights it gathered after its steps, and saves its checkpoint in tmp_path/name."""
    from sft_dist.worker.runtime import _free_port

    env = {**subprocess_env(), "WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(_free_port()), "PYTHONPATH": str(REPO)}
    out = tmp_path / f"{name}.pt"
    args = [sys.executable, str(REPO / "tests" / "zero_moments.py"), str(config), train_dir,
            str(tmp_path / name), restore, str(steps), str(out)]
    procs = [subprocess.Popen(args, cwd=REPO, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(world_size)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-2000:] for o in outputs)
    import torch

    return torch.load(out, weights_only=True)


def assert_same_state(restored: dict, saved: dict) -> None:
    import torch

    assert restored.keys() == saved.keys() and saved
    for name in saved:
        for part in ("exp_avg", "exp_avg_sq", "fp32"):
            assert torch.equal(restored[name][part], saved[name][part]), f"{name} {part} differs after the restore"
    assert any(bool(s["exp_avg"].abs().sum()) for s in saved.values())  # the moments are not all zero


@pytest.mark.parametrize("stage, peft", [(3, "none"), (3, "lora"), (1, "none")],
                         ids=["zero3-full", "zero3-lora", "zero1-full"])
def test_adam_moments_survive_2_to_1_to_2_workers(stage, peft, tmp_path):
    """What a world-size change restores, gathered, equals what was saved: Adam's exp_avg and exp_avg_sq
    and the fp32 master weights of every parameter (DeepSpeed's own universal-checkpoint test skips the
    ZeRO-3 optimizer comparison), under ZeRO-3 and ZeRO-1 (ZeRO-2 partitions the optimizer as ZeRO-1
    does; the drills resize it). Saved at 2 processes, restored at 1 through a universal copy, saved
    again at 1 and restored at 2. With LoRA the frozen base is not in the checkpoint at all."""
    from sft_dist.driver.commands import prepare_data

    cfg = config_lib.load(TINY_CONFIG, [f"output_dir={tmp_path}", *ELASTIC, f"deepspeed.stage={stage}",
                                              f"peft.method={peft}"])
    config = tmp_path / "config.json"
    config.write_text(json.dumps(cfg.model_dump(mode="json")))
    train_dir = prepare_data(cfg, use_ray=False).train_dir
    saved_at_2 = zero_group(2, tmp_path, config, train_dir, "-", 2, "two")
    # The one process is this one (as --no-ray runs are): it restores, compares, trains a step, saves.
    at_1 = {}

    def restored_at_1(state: dict) -> None:
        at_1.update(state)

    saved_at_1 = zero_moments.train_and_gather(cfg, train_dir, tmp_path / "one",
                                                str(tmp_path / "two" / "checkpoint_step_0000002"), 1,
                                                on_restored=restored_at_1)
    assert_same_state(at_1, saved_at_2)
    at_2 = zero_group(2, tmp_path, config, train_dir, str(tmp_path / "one" / "checkpoint_step_0000003"), 0,
                       "two-again")
    assert_same_state(at_2, saved_at_1)


# ---------------------------------------------------------------- the two-node drills


@pytest.fixture(scope="module")
def cluster():
    temp_dir = tempfile.mkdtemp(prefix="sftel-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(SFT_DIST_RAY_PORT=str(PORT), SFT_DIST_RAY_DASHBOARD_PORT="8299", SFT_DIST_RAY_CLIENT_PORT="6451",
               SFT_DIST_RAY_TEMP_DIR=temp_dir, SFT_DIST_RAY_WORKER_NODES="1", SFT_DIST_RAY_CPUS_PER_NODE="1",
               RAY_AUTH_MODE="token",  # as start.sh exports it (a test run alone has no ray.init to set it)
               RAY_BIN=str(BIN / "ray"), PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}", PYTHONPATH=str(REPO))
    try:
        start_nodes(env)
        yield env
    finally:
        subprocess.run(["bash", "cluster/local/stop.sh"], cwd=REPO, env=env, timeout=120)
        shutil.rmtree(temp_dir, ignore_errors=True)


def start_nodes(env: dict) -> None:
    """Start the cluster, or (running) the worker node again after it was stopped."""
    started = subprocess.run(["bash", "cluster/local/start.sh"], cwd=REPO, env=env, capture_output=True, text=True,
                             timeout=400)
    assert started.returncode == 0, started.stderr


def stop_worker_node(env: dict) -> None:
    """What a lost node does to the run: its `ray start` (raylet, agents, the worker on it) ends. Waits
    until its processes are gone (as stop.sh: 10 s, then SIGKILL), so starting it again starts a new one."""
    pid = int((Path(env["SFT_DIST_RAY_TEMP_DIR"]) / "sft_dist_nodes" / "worker-1.pid").read_text())
    os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    while group_alive(pid):
        if time.monotonic() > deadline:
            os.killpg(pid, signal.SIGKILL)
            break
        time.sleep(0.2)


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


@dataclass
class Drill:
    run_dir: Path
    exit_code: int
    out: str
    timeline: list[str]

    def account(self) -> str:
        """What a failed drill shows: what it did when, Ray's and the run's lines about the worker group
        and the cluster, and the end of the log."""
        said = [line for line in self.out.splitlines()
                if any(w in line for w in ("resiz", "Detected", "worker group", "Failed", "rror", "WARN", "restart"))]
        return "\n".join(["timeline:", *self.timeline, "log lines:", *said[-40:], "log end:", self.out[-1500:]])


class Timeline:
    """The drill's actions with their time since it started (a thread's too), for a failure's account."""

    def __init__(self):
        self.start, self.lines = time.monotonic(), []

    def note(self, what: str) -> None:
        self.lines.append(f"{time.monotonic() - self.start:6.1f} s  {what}")

    def timed(self, what: str, action, env: dict, view) -> None:
        """`action(env)`, then twice, 30 s apart, what Ray's elastic policy sees (`view(env)`)."""
        began = time.monotonic()
        try:
            action(env)
            self.note(f"{what} took {time.monotonic() - began:.1f} s")
            for _ in range(2):
                time.sleep(30)
                self.note(f"cluster: {view(env)}")
        except BaseException as failed:  # a thread's failure would otherwise show nowhere
            self.note(f"{what} failed after {time.monotonic() - began:.1f} s: {failed}")


def nodes_alive(env: dict) -> int:
    code = f"import ray; ray.init(address='127.0.0.1:{PORT}'); print(sum(n['Alive'] for n in ray.nodes()))"
    driver_env = {k: v for k, v in env.items() if k != "RAY_ADDRESS"}
    done = subprocess.run([sys.executable, "-c", code], env=driver_env, capture_output=True, text=True, timeout=120)
    return int(done.stdout.strip().splitlines()[-1])


# What Ray's elastic policy decides from: the alive nodes' CPUs, and its autoscaling coordinator's
# requests (requester, priority, seconds left, CPUs reserved per node), read on the coordinator itself.
CLUSTER_VIEW = """
import time, ray
ray.init(address='127.0.0.1:%d', logging_level='ERROR')
print('nodes', [(n['NodeManagerPort'], n['Resources'].get('CPU')) for n in ray.nodes() if n['Alive']])
try:
    coordinator = ray.get_actor('AutoscalingCoordinator', namespace='AutoscalingCoordinator')
    def requests(self):
        now = time.time()
        return {k: (r.priority, round(r.expiration_time - now),
                    {n[:6]: b.get('CPU') for n, b in r.reserved_resources.items()})
                for k, r in self._ongoing_reqs.items()}
    print('requests', ray.get(coordinator.__ray_call__.remote(requests), timeout=20))
except Exception as e:
    print('coordinator:', type(e).__name__, e)
"""


def cluster_view(env: dict) -> str:
    driver_env = {k: v for k, v in env.items() if k != "RAY_ADDRESS"}
    try:
        done = subprocess.run([sys.executable, "-c", CLUSTER_VIEW % PORT], env=driver_env, capture_output=True,
                              text=True, timeout=90)
        return " ".join(done.stdout.split()) or done.stderr[-300:]
    except subprocess.TimeoutExpired:
        return "no view in 90 s"


def train_records(events: list[dict]) -> list[dict]:
    return [e for e in events if "loss" in e]


def trained_at(events: list[dict], size: int, since_resize: bool) -> int:
    """Train records at world size `size` (only those after the newest resize record, if `since_resize`)."""
    resizes = [i for i, e in enumerate(events) if e.get("event") == "resize"]
    start = resizes[-1] if since_resize and resizes else 0
    return sum(e.get("world_size") == size for e in train_records(events[start:]))


# What a drill does to the cluster, in order, each once the run's records say it is time: 2 -> 1 -> 2
# (the worker node lost after step 3, started again once the run has trained two steps alone, past a
# checkpoint of its own, so that growing resizes it) or 1 -> 2 -> 1 (the run starts on the head node
# alone; the worker node starts after step 3 and is lost again after two steps at 2 workers).
SHRINK_GROW = (("lose", lambda events: len(train_records(events)) >= 3),
               ("regain", lambda events: trained_at(events, 1, True) >= 2))
GROW_SHRINK = (("regain", lambda events: trained_at(events, 1, False) >= 3),
               ("lose", lambda events: trained_at(events, 2, True) >= 2))


def group_size(events: list[dict]) -> int:
    """The world size of the newest worker group (each writes a setup record when it starts)."""
    return next((e["world_size"] for e in reversed(events) if e.get("event") == "setup"), 0)


def drill(env: dict, output_dir: Path, order: tuple, *overrides: str, timeout_s: float = 600) -> Drill:
    """An elastic run whose worker node is lost and regained as `order` says; every wait is bounded. From
    the regain until the run has grown it is held (debug.hold_while_file): on a slow machine the node's
    start and Ray's 20 s refresh of the cluster's resources could otherwise outlast the run."""
    run_dir, hold = output_dir / "drill", output_dir / "hold-while-the-node-starts"
    args = [a for o in [f"output_dir={output_dir}", "run_name=drill", f"ray.address=127.0.0.1:{PORT}",
                        "ray.shared_storage=true", *ELASTIC, "ray.max_failures=3", "ray.resize_interval_s=5",
                        f"train.max_steps={DRILL_STEPS}", "debug.step_sleep_s=1", "checkpoint.every_steps=2",
                        f"debug.hold_while_file={hold}", "eval.generate=null", *overrides] for a in ("--set", o)]
    driver_env = {k: v for k, v in env.items() if k != "RAY_ADDRESS"}
    # A restart right after the loss may still see the lost node's resources for a few seconds (Ray's
    # autoscaling coordinator refreshes them every 20 s): a short start timeout makes that try cheap.
    driver_env["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = "20"
    if order[0][0] == "regain":  # the run starts on the head node alone
        stop_worker_node(env)
        deadline = time.monotonic() + 120
        while nodes_alive(env) != 1:
            assert time.monotonic() < deadline, "the stopped worker node is still alive after 120 s"
            time.sleep(1)
    log = output_dir / "driver.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([str(BIN / "sft-dist"), "train", str(TINY_CONFIG), *args], cwd=REPO, env=driver_env,
                                stdout=out, stderr=subprocess.STDOUT)
    deadline, actions, restart, size_at_regain = time.monotonic() + timeout_s, list(order), None, 0
    timeline = Timeline()
    try:
        while proc.poll() is None:
            assert time.monotonic() < deadline, f"the drill did not finish ({actions}): {log.read_text()[-3000:]}"
            events = read_events(run_dir) if (run_dir / "metrics.jsonl").is_file() else []
            if hold.exists() and group_size(events) > size_at_regain:
                hold.unlink()
                timeline.note(f"hold released: a {group_size(events)}-worker group started")
            if actions and actions[0][1](events):
                action = actions.pop(0)[0]
                timeline.note(f"{action} after {len(train_records(events))} train records")
                if action == "lose":
                    stop_worker_node(env)
                else:
                    size_at_regain = group_size(events)
                    hold.touch()
                    restart = threading.Thread(target=timeline.timed, args=("the worker node's start", start_nodes, env,
                                                                            cluster_view), daemon=True)
                    restart.start()  # takes a while: the run waits for it
            time.sleep(0.5)
    finally:
        hold.unlink(missing_ok=True)
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=60)
        if restart is not None:
            restart.join(timeout=400)
    if order[-1][0] == "lose":  # leave the cluster whole for the next test
        start_nodes(env)
    return Drill(run_dir, proc.returncode, log.read_text(), timeline.lines)


def world_sizes(run_dir: Path) -> list[int]:
    """The train records' world sizes, each run of equal sizes once: [2, 1, 2] for lost and regained."""
    sizes = [e["world_size"] for e in read_events(run_dir) if "loss" in e]
    return [size for i, size in enumerate(sizes) if i == 0 or sizes[i - 1] != size]


# Full fine-tuning under ZeRO-2 (the tiny config's) loses and regains the node; LoRA under ZeRO-3 starts
# alone, grows and shrinks (each drill takes minutes on 2 cores). Both with dropout (LoRA's and the
# model's): its random numbers must continue exactly across each world-size change.
@dataclass(frozen=True)
class Variant:
    overrides: tuple[str, ...]
    order: tuple
    sizes: list[int]  # the world sizes the train records go through
    resizes: list[tuple[int, int, int]]  # (from, to, grad_accum) of each resize record


VARIANTS = {
    "full-zero2-2to1to2": Variant(("model.dropout=0.1",), SHRINK_GROW, [2, 1, 2], [(2, 1, 2), (1, 2, 1)]),
    "lora-zero3-1to2to1": Variant(("deepspeed.stage=3", "peft.method=lora", "peft.dropout=0.1", "model.dropout=0.1"),
                                  GROW_SHRINK, [1, 2, 1], [(1, 2, 1), (2, 1, 2)]),
}


@pytest.fixture(scope="module", params=list(VARIANTS))
def variant(request) -> Variant:
    return VARIANTS[request.param]


@pytest.fixture(scope="module")
def uninterrupted(ray_cluster, variant, tmp_path_factory):
    """The drill's reference: the same run at a fixed 2 workers, nothing lost."""
    return train_tiny(tmp_path_factory.mktemp("uninterrupted"), "ray.num_workers=2", "train.global_batch_size=8",
                      f"train.max_steps={DRILL_STEPS}", "checkpoint.every_steps=2", "eval.generate=null",
                      *variant.overrides)


def test_a_lost_node_shrinks_the_run_and_a_regained_one_grows_it_on_the_same_curve(cluster, variant, uninterrupted,
                                                                                   tmp_path):
    result = drill(cluster, tmp_path, variant.order, *variant.overrides)
    print("\n".join(result.timeline))  # pytest shows it with a failure
    assert result.exit_code == 0, result.account()
    assert world_sizes(result.run_dir) == variant.sizes, result.account()
    steps = [e["step"] for e in read_events(result.run_dir) if "loss" in e]
    assert steps == list(range(1, DRILL_STEPS + 1))  # steps trained again after a restart are recorded once
    assert train_losses(result.run_dir) == pytest.approx(train_losses(uninterrupted), rel=1e-4)
    assert eval_losses(result.run_dir) == pytest.approx(eval_losses(uninterrupted), rel=1e-4)
    assert learning_rates(result.run_dir) == pytest.approx(learning_rates(uninterrupted), rel=1e-9)
    resizes = [(e["from_world_size"], e["world_size"], e["grad_accum"]) for e in read_events(result.run_dir)
               if e.get("event") == "resize"]
    assert resizes == variant.resizes
    first = variant.resizes[0]
    assert f"resized: {first[0]} -> {first[1]} workers at step" in result.out, result.out[-3000:]
    assert "universal checkpoint converted in" in result.out
    assert "Converting DeepSpeed checkpoint" not in result.out  # the converter's own prints are ours to silence
    assert "MPU is not provided" not in result.out  # nor DeepSpeed's warning on loading it (no tensor parallel)


def test_min_workers_the_cluster_does_not_hold_are_refused_after_the_timeout(cluster, tmp_path):
    args = [a for o in [f"output_dir={tmp_path}", "run_name=big", f"ray.address=127.0.0.1:{PORT}",
                        "ray.shared_storage=true", "ray.num_workers=[4,4]", "train.grad_accum=",
                        "train.global_batch_size=16", "ray.min_workers_timeout_s=3"] for a in ("--set", o)]
    env = {k: v for k, v in cluster.items() if k != "RAY_ADDRESS"}
    result = subprocess.run([str(BIN / "sft-dist"), "train", str(TINY_CONFIG), *args], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "ray.num_workers: needs at least 4 workers, but after 3 s the cluster holds 2" in lines[0]
    assert not (tmp_path / "big").exists()


def test_a_run_left_below_min_workers_stops_after_the_timeout(cluster, tmp_path):
    """[2, 2] on two one-worker nodes: losing one leaves the cluster a worker short of MIN, which Ray's
    elastic policy would wait for forever; the run stops after ray.min_workers_timeout_s in one line."""
    result = drill(cluster, tmp_path, SHRINK_GROW[:1], "ray.num_workers=[2,2]", "ray.min_workers_timeout_s=10",
                   "train.max_steps=1000", timeout_s=300)
    assert result.exit_code == 1, result.out[-3000:]
    assert ("ray.num_workers: the cluster held 1 worker(s), below MIN 2, for 10 s; the run stopped"
            in result.out), result.out[-3000:]
    assert any(result.run_dir.glob("checkpoint_step_*")), "its checkpoints are kept for --resume auto"


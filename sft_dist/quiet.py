"""Library output the user cannot act on, silenced where it is made: one function per line (or kind of
line), each through the switch its library offers (a logger filter, a warnings filter, an environment
variable, a config), each guarded by the versions known to emit it, and each with a test
(tests/test_quiet.py) that fails once upstream stops emitting it, so the filter can go.

`driver()` runs first thing in the CLI, before Ray or DeepSpeed are imported (Ray reads its log
settings on import); `worker()` runs in every worker process before torch or DeepSpeed work starts.
Real warnings and errors stay visible: every filter matches one known message, never a level or a
whole library. SFT_DIST_LIBRARY_LOGS=1 turns all of them off (to see everything, e.g. for a bug report).
Imports neither Ray nor DeepSpeed.
"""

from __future__ import annotations

import builtins
import contextlib
import io
import logging
import os
import re
import sys
import warnings
from collections.abc import Iterator
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

SHOW_ALL = "SFT_DIST_LIBRARY_LOGS"
# Ray Train's own INFO lines (resources requested, worker group started, process group set up) say
# nothing a user of sft_dist can act on; its warnings and errors (a failed worker group, a restart) stay.
RAY_TRAIN_LOG_LEVEL = "WARNING"


def enabled() -> bool:
    return os.environ.get(SHOW_ALL) != "1"


def driver() -> None:
    """The driver process: call before `import ray` and before anything imports deepspeed."""
    if not enabled():
        return
    ray_log_colours()
    ray_preemption_watcher_restart_warning()
    ray_train_report_line()
    ray_token_authentication_notice()
    deepspeed_cpu_fallback_warning()


def worker() -> None:
    """A worker process (a Ray Train worker, or the --no-ray process): before torch/DeepSpeed work."""
    if not enabled():
        return
    deepspeed_cpu_fallback_warning()
    torch_all_gather_into_tensor_deprecation()
    torch_reduce_scatter_tensor_deprecation()
    deepspeed_universal_load_mpu_warning()
    transformers_loading_progress_bar()
    whisper_generate_config_notice()
    generate_length_notice()


def _version(package: str) -> tuple[int, ...]:
    try:
        return tuple(int(p) for p in re.findall(r"\d+", version(package))[:2])
    except PackageNotFoundError:
        return ()


def _drop_messages(logger_name: str, pattern: str) -> None:
    """A filter on one library logger that drops the records whose message matches `pattern`."""
    found = re.compile(pattern)

    class DropKnownMessage(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return not found.search(record.getMessage())

    logger = logging.getLogger(logger_name)  # the same object the library configures later
    if not any(getattr(f, "pattern", None) == pattern for f in logger.filters):
        drop = DropKnownMessage()
        drop.pattern = pattern  # type: ignore[attr-defined]  # makes a second call a no-op
        logger.addFilter(drop)


def _skip_forwarded_lines(pattern: str) -> None:
    """Ray prints worker processes' output on the driver; RAY_DEDUP_LOGS_SKIP_REGEX (Ray's log
    deduplication settings, read when ray is imported) drops the lines that match. One regex for all."""
    current = os.environ.get("RAY_DEDUP_LOGS_SKIP_REGEX")
    if current and pattern in current.split("|"):
        return
    os.environ["RAY_DEDUP_LOGS_SKIP_REGEX"] = f"{current}|{pattern}" if current else pattern


# ------------------------------------------------------------------------------------------ driver

def ray_log_colours() -> None:
    """Ray wraps every forwarded worker line's prefix in ANSI colour codes, also when the driver's output
    is a file or a pipe (`ray job logs`, CI, `> log.txt`); RAY_COLOR_PREFIX=0 leaves them out."""
    if not sys.stdout.isatty():
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")


RAY_PREEMPTION_WATCHER = r"Actor with class name: 'PreemptionWatcher' .* the actor restart will fail"


def ray_preemption_watcher_restart_warning() -> None:
    """Ray 2.60's core worker logs an error when an actor with restarts gets its constructor arguments
    through the object store (ray-project/ray#53727, the warning added in #53713). Ray Train's own
    PreemptionWatcher (ray/train/v2/_internal/callbacks/preemption_callback.py) is such an actor, on
    every run: the line is about Ray Train's internals, and nothing in sft_dist's hands changes it."""
    if _version("ray")[:2] == (2, 60):
        _skip_forwarded_lines(RAY_PREEMPTION_WATCHER)


RAY_TRAIN_REPORT = r"Reporting training result \d+: TrainingReport\("


def ray_train_report_line() -> None:
    """Ray Train 2.60 logs every `ray.train.report` with a checkpoint, with the checkpoint and all its
    metrics (ray/train/v2/_internal/execution/context.py), through a logger named by that file's path,
    which `LoggingConfig(log_level=...)` does not govern: on the worker's stderr it is forwarded to the
    driver, two lines per checkpoint. sft_dist's own progress lines already say all of it."""
    if _version("ray")[:2] == (2, 60):
        _skip_forwarded_lines(RAY_TRAIN_REPORT)


RAY_TOKEN_NOTICE = r"^Token authentication is enabled for this Ray cluster"


def ray_token_authentication_notice() -> None:
    """Ray 2.60 warns on every `ray.init` that token authentication is on, and how to opt out. sft_dist
    keeps it on deliberately (README: Ray cluster); opting out is not advice to print on every run."""
    if _version("ray")[:2] == (2, 60):
        _drop_messages("ray._private.authentication.authentication_token_setup", RAY_TOKEN_NOTICE)


DEEPSPEED_CPU_FALLBACK = r"^Setting accelerator to CPU\. If you have GPU"


def deepspeed_cpu_fallback_warning() -> None:
    """DeepSpeed 0.19 warns on import (deepspeed/accelerator/real_accelerator.py) when torch sees no GPU
    and it falls back to its CPU accelerator: on a CPU machine, every command. Where torch does see a GPU
    DeepSpeed picks it without a word; a GPU that torch cannot see shows in torch's own errors and in
    `ray.use_gpu` runs failing to start, not here."""
    if _version("deepspeed")[:2] == (0, 19):
        _drop_messages("DeepSpeed", DEEPSPEED_CPU_FALLBACK)


# ------------------------------------------------------------------------------------------ worker

TORCH_ALL_GATHER_DEPRECATION = r"`torch\.distributed\.all_gather_into_tensor` is deprecated"


def torch_all_gather_into_tensor_deprecation() -> None:
    """torch 2.13 deprecates `all_gather_into_tensor` (torch/distributed/c10d_logger.py), which DeepSpeed
    0.19's ZeRO calls at every step (83 times in a 20-step tiny run): DeepSpeed's to change, not ours."""
    if _version("torch")[:2] >= (2, 13) and _version("deepspeed")[:2] == (0, 19):
        warnings.filterwarnings("ignore", message=TORCH_ALL_GATHER_DEPRECATION, category=FutureWarning)


TORCH_REDUCE_SCATTER_DEPRECATION = r"`torch\.distributed\.reduce_scatter_tensor` is deprecated"


def torch_reduce_scatter_tensor_deprecation() -> None:
    """Its sibling: torch 2.13 deprecates `reduce_scatter_tensor`, which DeepSpeed 0.19's ZeRO-3 calls to
    reduce gradients (twice a step per rank in a LoRA run); DeepSpeed's to change, not ours."""
    if _version("torch")[:2] >= (2, 13) and _version("deepspeed")[:2] == (0, 19):
        warnings.filterwarnings("ignore", message=TORCH_REDUCE_SCATTER_DEPRECATION, category=FutureWarning)


DEEPSPEED_NO_MPU = r"^MPU is not provided, setting tp size to 1 in checkpoint loading"


def deepspeed_universal_load_mpu_warning() -> None:
    """DeepSpeed 0.19 warns on every rank that loads a universal checkpoint (each world-size change,
    runtime/base_optimizer.py) that no model-parallel unit was given: sft_dist has no tensor
    parallelism, so tp size 1 is right and there is nothing to give."""
    if _version("deepspeed")[:2] == (0, 19):
        _drop_messages("DeepSpeed", DEEPSPEED_NO_MPU)


def transformers_loading_progress_bar() -> None:
    """transformers 5 draws a "Loading weights" progress bar on every `from_pretrained`; in a worker's
    output (never a terminal: Ray forwards it line by line) it is two lines of carriage returns per rank.
    On a terminal (`--no-ray`) the bar stays: for a large model it is the sign that loading goes on."""
    if not sys.stderr.isatty():
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()


WHISPER_GENERATE_CONFIG = (r"^Passing `generation_config` together with generation-related arguments="
                           r"\(\{'(begin_)?suppress_tokens', '(begin_)?suppress_tokens'\}\)")


def whisper_generate_config_notice() -> None:
    """transformers 5's Whisper `generate` (models/whisper/generation_whisper.py) passes its own
    generation config together with `suppress_tokens` and `begin_suppress_tokens` to the generic one,
    which then warns once per process that this is deprecated: at every speech validation's first
    transcript, from transformers' own call."""
    if _version("transformers")[:1] == (5,):
        _drop_messages("transformers.generation.utils", WHISPER_GENERATE_CONFIG)


GENERATE_LENGTH = r"^Both `max_new_tokens` \(=\d+\) and `max_length`\(=\d+\) seem to have been set"


def generate_length_notice() -> None:
    """Validation bounds each answer and transcript by `max_new_tokens` (the longest held-out answer plus
    a margin) on purpose; a model whose generation config names a `max_length` (Whisper's decoder
    limit, which generate still enforces) then gets this notice from transformers 5 at every batch."""
    if _version("transformers")[:1] == (5,):
        _drop_messages("transformers.generation.utils", GENERATE_LENGTH)


DEEPSPEED_SHM_BUILT = r"^DeepSpeed deepspeed\.ops\.comm\.deepspeed_shm_comm_op built successfully$"


@contextlib.contextmanager
def deepspeed_shm_comm_built() -> Iterator[None]:
    """Around `deepspeed.init_distributed` on CPU: DeepSpeed 0.19 `print`s that its shared-memory
    collectives op loaded (deepspeed/comm/torch.py, build_shm_op) on every start of every rank, with no
    logger or setting to turn it off; every other line printed meanwhile is passed on. In a Ray Train
    worker `print` itself is Ray's (RAY_TRAIN_ENABLE_PRINT_PATCH): it logs each line to the root logger
    too, so the same line is dropped there."""
    if not enabled() or _version("deepspeed")[:2] != (0, 19):
        yield
        return
    _drop_messages("", DEEPSPEED_SHM_BUILT)
    captured = io.StringIO()
    try:
        with contextlib.redirect_stdout(captured):
            yield
    finally:
        kept = [line for line in captured.getvalue().splitlines() if not re.match(DEEPSPEED_SHM_BUILT, line)]
        if kept:
            print("\n".join(kept), flush=True)


@contextlib.contextmanager
def prints_dropped() -> Iterator[None]:
    """Around DeepSpeed's `ds_to_universal`, which `print`s its arguments and every phase of a conversion
    (a dozen lines per world-size change, with no logger or setting to turn them off); the run's own
    `resized: ... converted in N s` line says what happened, and a failure still raises its message.
    Redirecting stdout is not enough in a Ray Train worker, whose `print` is Ray's (RAY_TRAIN_ENABLE_PRINT_PATCH)
    and also logs each line to the root logger: `print` itself is swapped for the call."""
    if not enabled():
        yield
        return
    current = builtins.print
    builtins.print = lambda *args, **kwargs: None
    try:
        yield
    finally:
        builtins.print = current


# ------------------------------------------------------------------------------------------ said once

def deepspeed_op_builds(use_gpu: bool, offload_optimizer: bool, local_rank: int) -> str | None:
    """What the first start of an environment spends its first minute on, silent otherwise: on CPU
    workers DeepSpeed 0.19 JIT-compiles its shared-memory collectives (in `init_distributed`) and its
    Adam (fused_adam; cpu_adam with optimizer offload, in `deepspeed.initialize`) into
    TORCH_EXTENSIONS_DIR (one folder per op; runtime.configure_worker sets it per Python environment),
    and loads them from there afterwards. Said once per node (local rank 0) when one is not built yet;
    returns the line said, if any."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if use_gpu or local_rank != 0 or root is None:
        return None
    ops = ("deepspeed_shm_comm", "cpu_adam" if offload_optimizer else "fused_adam")
    missing = [op for op in ops if not (Path(root) / op / f"{op}.so").is_file()]
    if not missing:
        return None
    line = (f"building DeepSpeed's {' and '.join(missing)} op{'s' if len(missing) > 1 else ''} for this "
            f"environment (once, about a minute); later starts load {'them' if len(missing) > 1 else 'it'} "
            f"from {root}")
    print(line, flush=True)
    return line

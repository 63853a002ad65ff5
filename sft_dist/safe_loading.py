"""Loading a checkpoint never runs code, whoever wrote it.

A `.pt` file is a pickle, and a pickle can call any function on load (`__reduce__`). Our own loads
pass `weights_only=True`, but DeepSpeed's `load_checkpoint`, `ds_to_universal` and `zero_to_fp32`
pass `weights_only=False`. Two layers close that:

- `enforce()`, called by every process that loads checkpoints (runtime.configure_worker: Ray and
  `--no-ray` workers, the export process, the bench), sets TORCH_FORCE_WEIGHTS_ONLY_LOAD, which
  torch honours even where the caller asks for a full unpickle, and allows the few DeepSpeed types
  its checkpoints hold. The variable is inherited by child processes (DeepSpeed's converters can
  fork extraction workers); one that never called `enforce()` fails closed, on DeepSpeed's types.
- `refuse_unsafe(folder)`, before a checkpoint is loaded, reads each file's pickle without running it
  and refuses the folder in one line naming the file and what it would have called, instead of
  torch's many-line message from deep inside DeepSpeed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from sft_dist.errors import UserError

FORCE_WEIGHTS_ONLY = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"


def deepspeed_state_types() -> list[Any]:
    """The classes DeepSpeed pickles into its checkpoints besides tensors and containers (found with
    torch.serialization.get_unsafe_globals_in_checkpoint on ZeRO 0-3, LoRA, bf16 and universal
    checkpoints): plain records, none of which runs anything when rebuilt."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def allowed_names() -> set[str]:
    return {f"{t.__module__}.{t.__qualname__}" for t in deepspeed_state_types()}


def enforce() -> None:
    """Make every `torch.load` in this process (and its children) a weights-only load that knows
    DeepSpeed's state types."""
    import torch

    os.environ[FORCE_WEIGHTS_ONLY] = "1"
    torch.serialization.add_safe_globals(deepspeed_state_types())


def refuse_unsafe(folder: Path) -> None:
    """Raise a UserError naming the first `.pt` file under `folder` whose pickle would call anything
    beyond tensors, containers and DeepSpeed's state types. Reads only the pickles, not the tensors."""
    import torch

    allowed = allowed_names()
    for file in sorted(folder.rglob("*.pt")):
        try:
            unsafe = set(torch.serialization.get_unsafe_globals_in_checkpoint(file)) - allowed
        except (ValueError, RuntimeError, KeyError) as err:  # not a torch.save zip: nothing loads it safely
            raise UserError(f"refused to load this checkpoint file: not a torch checkpoint ({err})",
                            file=str(file)) from None
        if unsafe:
            raise UserError(f"refused to load this checkpoint file: its pickle would call {', '.join(sorted(unsafe))}, "
                            "which no sft_dist checkpoint holds (loading it could run code)", file=str(file))

"""What the loop, checkpoints and validation use of a DeepSpeed engine, as a type: deepspeed.DeepSpeedEngine
satisfies it structurally, and the modules that only drive an engine need not import DeepSpeed to name it."""

from __future__ import annotations

from typing import Any, Protocol

import torch


class TrainEngine(Protocol):
    module: torch.nn.Module  # the wrapped model (a PEFT model for adapter runs)
    optimizer: Any  # DeepSpeed's optimizer wrapper; its `param_groups` are torch's

    def __call__(self, *args: Any, **kwargs: Any) -> Any: ...  # the model's forward (returns its output)

    def backward(self, loss: torch.Tensor) -> Any: ...

    def step(self) -> None: ...  # the optimizer and scheduler step, at the accumulation boundary only

    def get_lr(self) -> list[float]: ...

    def get_global_grad_norm(self) -> float | None: ...

    def save_checkpoint(self, save_dir: str, tag: str, client_state: dict[str, Any],
                        exclude_frozen_parameters: bool) -> Any: ...

    def load_checkpoint(self, load_dir: str, tag: str, load_optimizer_states: bool, load_lr_scheduler_states: bool,
                        load_module_strict: bool) -> Any: ...

"""ZeRO-3 construction of models whose `_init_weights` reads a loaded weight's shape or value.

transformers 5 builds a model under `deepspeed.zero.Init` (every parameter partitioned: shape (0,) on
each rank), loads the checkpoint into the partitions, then runs `initialize_weights` over every module
with only the *missing* parameters gathered. Its init functions skip loaded tensors, but some models
compute the init value before calling them, from a partitioned tensor: Whisper's encoder builds
`sinusoids(*embed_positions.weight.shape)` (TypeError on shape (0,)); wav2vec2's weight-normed
positional convolution recomputes its weight from partitioned `weight_g`/`weight_v` (IndexError). Either
way from_pretrained fails, though nothing there needs initialising. transformers has no switch for it,
so the dispatcher skips a module whose parameters and buffers were all loaded: the init it would have
run writes nothing (its init functions skip loaded tensors), so the weights are the same.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from importlib.metadata import version

import torch
from transformers import PreTrainedModel


def _all_loaded(module: torch.nn.Module) -> bool:
    tensors = [*module.parameters(), *module.buffers()]
    return bool(tensors) and all(getattr(t, "_is_hf_initialized", False) for t in tensors)


@contextlib.contextmanager
def loaded_modules_not_reinitialised() -> Iterator[None]:
    if int(re.match(r"\d+", version("transformers")).group()) != 5:  # the dispatcher this wraps is 5.x's
        yield
        return
    dispatch = PreTrainedModel._initialize_weights

    def skip_loaded(self: PreTrainedModel, module: torch.nn.Module, *args, **kwargs) -> None:
        if _all_loaded(module):
            module._is_hf_initialized = True
            return
        dispatch(self, module, *args, **kwargs)

    PreTrainedModel._initialize_weights = skip_loaded
    try:
        yield
    finally:
        PreTrainedModel._initialize_weights = dispatch

"""What the training loop watches besides progress: a step whose loss or gradient norm is not finite
(the run stops, agreed by all ranks, keeping its last finite checkpoint), and a model that stopped
learning (the gradient norm exactly zero step after step: a warning, once).

Pure: the loop feeds it each step's numbers; it says what is wrong.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# Steps in a row with a gradient norm of exactly 0 before the run warns. Real training never has an
# exactly-zero norm; a model saturated by a huge learning rate (or with all its gradients cut) does.
DEAD_MODEL_STEPS = 5


@dataclass
class Health:
    zero_grad_steps: int = 0
    warned_dead: bool = False

    @staticmethod
    def non_finite(step: int, rank: int, loss_sum: float, grad_norm: float | None) -> str | None:
        """Why this rank's step is not finite, or None. `loss_sum`: this rank's summed loss of the step;
        `grad_norm`: the step's global norm (the same on every rank), None where DeepSpeed keeps none."""
        if not math.isfinite(loss_sum):
            return f"the training loss was {loss_sum} at step {step} on rank {rank}"
        if grad_norm is not None and not math.isfinite(grad_norm):
            return f"the gradient norm was {grad_norm} at step {step}"
        return None

    def dead_model(self, step: int, grad_norm: float | None) -> str | None:
        """A warning, the first time the gradient norm has been exactly 0 for DEAD_MODEL_STEPS steps."""
        self.zero_grad_steps = self.zero_grad_steps + 1 if grad_norm == 0.0 else 0
        if self.warned_dead or self.zero_grad_steps < DEAD_MODEL_STEPS:
            return None
        self.warned_dead = True
        return (f"the gradient norm has been 0 for {self.zero_grad_steps} steps (to step {step}): the model is not "
                "learning (a learning rate far too high saturates it; check train.lr)")

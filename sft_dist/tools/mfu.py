"""Model FLOP/s utilization for `sft-dist bench` on GPUs: 6·N·tokens/s over the device's peak FLOP/s.

6·N per token is the usual training estimate (2·N forward, 4·N backward, attention left out), with N
every parameter of the model. The peaks are dense (no sparsity) tensor-core figures from the vendors'
datasheets, per training precision (fp32 trains in TF32 where the device has it); `--peak-tflops`
overrides them for a device not listed or a clock that differs.
"""

from __future__ import annotations

from sft_dist.errors import UserError

# Device name substring -> {precision: dense peak TFLOP/s}. Longer names are matched first (H100 PCIe).
PEAK_TFLOPS = {
    "B200": {"bf16": 2250.0, "fp16": 2250.0, "fp32": 1100.0},
    "H200": {"bf16": 989.4, "fp16": 989.4, "fp32": 494.7},
    "H100 PCIe": {"bf16": 756.0, "fp16": 756.0, "fp32": 378.0},
    "H100": {"bf16": 989.4, "fp16": 989.4, "fp32": 494.7},
    "A100": {"bf16": 312.0, "fp16": 312.0, "fp32": 156.0},
    "L40S": {"bf16": 362.1, "fp16": 362.1, "fp32": 183.0},
    "A10G": {"bf16": 70.0, "fp16": 70.0, "fp32": 35.0},
    "A10": {"bf16": 125.0, "fp16": 125.0, "fp32": 62.5},
    "L4": {"bf16": 121.0, "fp16": 121.0, "fp32": 60.0},
    "V100": {"fp16": 125.0, "fp32": 15.7},
}


def peak_tflops(device_name: str, precision: str, override: float | None = None) -> float:
    """The device's peak TFLOP/s at `precision`: `override` when given, else from the table."""
    if override is not None:
        return override
    for name in sorted(PEAK_TFLOPS, key=len, reverse=True):
        if name in device_name and precision in PEAK_TFLOPS[name]:
            return PEAK_TFLOPS[name][precision]
    raise UserError(f"no peak FLOP/s known for {device_name!r} at {precision}; pass --peak-tflops",
                    key="--peak-tflops")


def mfu(num_params: int, tokens_per_s: float, peak: float) -> float:
    """The share of the peak (TFLOP/s) that 6·N FLOPs per trained token at `tokens_per_s` amount to."""
    return 6 * num_params * tokens_per_s / (peak * 1e12)

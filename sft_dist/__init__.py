"""sft_dist: distributed supervised fine-tuning on Ray Train workers with DeepSpeed ZeRO engines."""

__version__ = "0.1.0"

"""Data: sources → normalized conversations → tokens with labels → batches. Knows nothing of DeepSpeed
or Ray, and never calls torch.distributed."""

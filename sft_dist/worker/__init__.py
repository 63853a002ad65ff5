"""What runs inside each Ray Train worker (and in the one process of --no-ray): the process
group, the training loop and its parts, the DeepSpeed engine, checkpoints, validation."""

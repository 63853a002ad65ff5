"""Commands beside training that do not run the training loop: bench, plan, export, the
learning-rate range test's analysis, MFU."""

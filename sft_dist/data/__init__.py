"""Data: sources (sources) → normalized rows (formats) → tokens with labels (templates, chat, encode) →
cached, optionally packed rows (prepare, packing) → global batches and tensors (batches); statistics
(stats) and bad-row reporting (badrows); label names for classifiers (labels); other modalities' rows
and batches (images, audio, vlm, detection, segmentation). Knows nothing of DeepSpeed or Ray, and never calls
torch.distributed."""

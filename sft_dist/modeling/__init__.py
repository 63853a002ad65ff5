"""Hugging Face models, PEFT adapters, the loss, and the model folder's format (config, tokenizer, end
ids): used by workers, the driver's checks and export alike; imports neither Ray nor DeepSpeed and never
touches torch.distributed."""

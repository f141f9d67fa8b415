"""The plain PyTorch DiffusionGemma: config, forward pass, KV cache, checkpoint loading, tokenizer."""

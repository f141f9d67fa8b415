"""Generation: the entropy-bound sampler, the block-diffusion loop and the command line."""

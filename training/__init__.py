"""Training a DiffusionGemma from scratch, for any task: the recipe a task fills in (recipe), the block-diffusion and
autoregressive objectives (objective), and the loop with its resumable run folders (trainer)."""

"""dgemma: a compact, fast reimplementation of Google's DiffusionGemma."""

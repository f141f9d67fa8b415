"""Fused Triton kernels (attention, MoE, vocabulary pass); they arrive with the kernel issues."""

"""Sparse autoencoders: the inference model, the seed-batched training model and trainer, the sparse
Triton kernels, and the measures of a trained SAE."""

"""PyTorch backend (transformers models, CPU and CUDA)."""

"""The MLX backend: Hugging Face-format and mlx-community models through mlx-lm (Apple Silicon; CPU and CUDA builds)."""

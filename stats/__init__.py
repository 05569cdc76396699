"""Stats format v1: per-head pre-RoPE query statistics (see FORMAT.md)."""

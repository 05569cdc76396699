"""triattn-local: run reasoning models locally with TriAttention KV-cache compression."""
__version__ = "0.1.0"

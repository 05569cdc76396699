"""The embedded demo reasoning model: its synthetic task, tokenizer and shipped weights (see README)."""

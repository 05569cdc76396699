"""Textual chat app (issue 5)."""

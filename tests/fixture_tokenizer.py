"""Session-scoped tokenizer fixtures (a tokenizer trained once on the Python standard library)."""

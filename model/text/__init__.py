"""Tokens and text: tokenizer, incremental detokenizer, chat template."""

"""Grammar-constrained decoding (issue 19): a request's Constraint compiled by llguidance into a per-row logits
processor for the sampler's hook. source.py: Constraint -> grammar text; compiler.py: the bounded compile and its
cache (Grammars, for_tokenizer); matcher.py: one row's matcher and its mask (GrammarRow)."""

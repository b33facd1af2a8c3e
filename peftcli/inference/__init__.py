"""Using a model once it is built: `evaluate` (metrics on tokenized examples), `generate` (greedy
text from a run or recipe) and `multi` (several runs of one base model in mixed batches)."""

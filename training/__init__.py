"""Training stage: read text, build or load a GPT-2, fine-tune it, measure perplexity."""

"""Serving stage: the generation engine (plain Python + onnxruntime) and the BentoML shell."""

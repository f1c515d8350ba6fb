"""Export stage: ONNX export, int8 quantization, parity checks, BentoML model store import."""

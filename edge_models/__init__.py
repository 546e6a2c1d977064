"""Build side: local checkpoint → (prune → distill) → ONNX decoder with KV cache → quantize → plan."""

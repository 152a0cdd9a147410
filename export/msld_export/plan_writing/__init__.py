"""Writing plans: ONNX export checked against PyTorch, graph rewrites, int8 quantization, defaults."""

"""Tools around the runtime: latency benchmark, FLOP counting, TensorRT engine builds, CPU features."""

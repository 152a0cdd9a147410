"""Samplers in PyTorch: the batched whole loop (CPU or GPU), the GPU path with the native CUDA kernels, and the baselines the SDK is compared with."""

"""Training on the CPU or a GPU: data batches and augmentation, the training loop, what a plan records of its training input."""

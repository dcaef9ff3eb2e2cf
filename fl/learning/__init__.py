"""The model, the data and its shards, augmentation, local training and 8-bit quantization:
plain PyTorch, no sockets."""

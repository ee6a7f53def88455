"""Data: tokenizers, task loaders and the batching that turns examples into fixed-shape arrays."""

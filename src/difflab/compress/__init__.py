"""Few-step and compressed inference: distillation, quantisation, pruning (docs/compression.md)."""

"""pistill.compress: activation importance, pruning, teacher quantization and distillation."""

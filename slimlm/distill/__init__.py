"""Distillation: losses (plain and chunked fused-linear), teacher signal, trainer."""

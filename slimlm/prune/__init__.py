"""Structured pruning: apply kept-sets to HF models (slice.py); OSSCAR and baselines come next."""

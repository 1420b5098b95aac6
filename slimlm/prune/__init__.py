"""Structured pruning: OSSCAR (osscar.py, pure maths) and baselines (baselines.py) choose what to keep,
calibrate.py gathers the statistics layer by layer, depth.py ranks layers, slice.py cuts the model,
pipeline.py runs it all: ``prune_model(model, calib_batches, PruneConfig) -> (smaller model, report)``."""

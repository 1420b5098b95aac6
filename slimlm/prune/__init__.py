"""Structured pruning: OSSCAR (osscar.py, pure maths) and baselines (baselines.py) choose what to keep,
calibrate.py gathers the statistics layer by layer (on slimlm.calib's batches and layer-by-layer passes),
depth.py ranks layers, slice.py cuts the model, api.py runs it all:
``prune_model(model, calib_batches, PruneConfig) -> (smaller model, report)``."""

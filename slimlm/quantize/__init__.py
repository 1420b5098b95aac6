"""Quantization: FP8 / INT8 W8A8 and INT4 weight-only, runtime modules, compressed-tensors export.

- :mod:`~slimlm.quantize.schemes`: the math (scales, quantize/dequantize, int4 packing, SmoothQuant).
- :mod:`~slimlm.quantize.gptq`: GPTQ error-compensating int4 quantization (pure math).
- :mod:`~slimlm.quantize.quantease`: QuantEase coordinate descent on GPTQ's layer objective (pure math).
- :mod:`~slimlm.quantize.calibrate`: hooks collecting per-layer input statistics (data: :mod:`slimlm.calib`).
- :mod:`~slimlm.quantize.linear`: runtime modules (int8 matmul, fp8, int4) replacing ``nn.Linear``.
- :mod:`~slimlm.quantize.api`: ``quantize_model(model, QuantConfig(...), calib_blocks)``.
- :mod:`~slimlm.quantize.export`: write / read compressed-tensors checkpoints.
"""

"""The one runtime that runs models, shared by evaluation, distillation, benchmarks and the server.

- :mod:`slimlm.runtime.scoring`: label-token probabilities after a prompt, with shared-prefix KV reuse
  (the ranking score P(" Yes") over {" Yes", " No"}).
- :mod:`slimlm.runtime.shared_prefix`: many candidates attending to one prefix's KV in place (no copy of the
  prefix per candidate), for the broadcast way of scoring.
- :mod:`slimlm.runtime.prefix_cache`: prompt KV kept across calls (a token radix tree under a byte budget),
  so a prefix seen before runs only its new tokens.
- :mod:`slimlm.runtime.decoding`: sampling, (chunked) prefill, the KV-cached decode batch that sequences
  join and leave, and the generation loops over it.
- :mod:`slimlm.runtime.kv_cache`: the decode batch's KV cache, preallocated per-layer buffers written in
  place (a transformers ``Cache`` that every model family's attention updates).
- :mod:`slimlm.runtime.text`: incremental detokenisation and stop strings for generated text.

A speedup or a fix here reaches every caller; this package imports nothing from ``distill`` or ``serve``.
"""

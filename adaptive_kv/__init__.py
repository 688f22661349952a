"""adaptive_kv: a mixed-precision, bit-packed KV cache for llama-architecture models.

Modules, one concept each: ``formats`` (quantize + pack one row), ``hadamard`` (rotation),
``cache`` (per-precision pools), ``attention`` (blockwise LSE-merged attention), ``decoder``
(llama forward over the cache), ``features`` (per-token signals), ``policy`` (bit-width
choice), ``controller`` (the learned MLP), ``session`` (prefill / commit / decode),
``model`` (loading), ``tasks`` + ``evaluate`` (accuracy harness).
"""

__version__ = "0.1.0"

"""Pure-PyTorch implementation of the Matrix-Game 2.0 models and their encoders.

One file per component: shapes (the shape rules), config, rope, action, model (the base
model), causal and kv_cache (the streaming student and its caches), vae, clip,
conditioning, flow, loading, files (atomic writes).
"""

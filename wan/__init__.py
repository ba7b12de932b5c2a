"""Pure-PyTorch implementation of the Matrix-Game 2.0 base model and its encoders.

One file per component: shapes (the shape rules), config, rope, action, model,
vae, clip, conditioning, flow, loading, files (atomic writes).
"""

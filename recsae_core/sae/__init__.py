"""Stage 4, SAE. Takes probed activations. Produces a TopK SAE (SAELens layout) with per-latent statistics,
its training, selection and sweeps, the edits that steer it, and the numpy runtime the service and offline jobs share.
"""

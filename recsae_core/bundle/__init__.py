"""Stage 6, bundle. Takes a run (or an outside ONNX model) with its SAE, catalog and policies.
Produces the one verified folder the service loads: ONNX model, items, users, SAE, manifest of hashes.
"""

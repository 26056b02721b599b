"""Shared helpers under every stage: errors, atomic artifacts and hashing, the run layout, ONNX sessions, HTML pages.
Imports nothing else from recsae_core.
"""

"""Stage 3, probe. Takes a trained recommender (PyTorch, or an ONNX model with its inputs).
Produces the representation h of every user or history prefix, in safetensors shards under RUN/probe/.
"""

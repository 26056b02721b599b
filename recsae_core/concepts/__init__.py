"""Stage 5a, concepts. Takes the run's SAE, activations and item/user metadata.
Produces the concept catalog: every live latent named (TF-IDF or a language model), described and scored.
"""

"""Stage 5b, de-biasing. Takes the run's SAE, recommender and data, and a bias target (popularity, gender).
Produces steering policies (RUN/policies/), measured against re-ranking baselines, with a report.
"""

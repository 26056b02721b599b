"""Stage 2, recommenders. Takes a Dataset and Split; produces a trained BPR-MF, LightGCN or SASRec behind one
interface (represent -> h, score), its evaluation, and the run folder's recommender/ (RunContext reloads it)."""

from recsae_core.recommenders.base import Batch, Recommender, RecommenderConfig
from recsae_core.recommenders.bprmf import BPRMF
from recsae_core.recommenders.lightgcn import LightGCN, LightGCNConfig
from recsae_core.recommenders.sasrec import SASRec, SASRecConfig

MODELS: dict[str, type[Recommender]] = {m.name: m for m in (BPRMF, LightGCN, SASRec)}

__all__ = [
    "BPRMF",
    "MODELS",
    "Batch",
    "LightGCN",
    "LightGCNConfig",
    "Recommender",
    "RecommenderConfig",
    "SASRec",
    "SASRecConfig",
]

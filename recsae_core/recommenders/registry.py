"""The recommender families by name (`--model`), for building, checkpoint loading and probing."""

from recsae_core.recommenders.base import Recommender
from recsae_core.recommenders.bprmf import BPRMF
from recsae_core.recommenders.lightgcn import LightGCN
from recsae_core.recommenders.sasrec import SASRec

MODELS: dict[str, type[Recommender]] = {m.name: m for m in (BPRMF, LightGCN, SASRec)}

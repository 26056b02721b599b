"""Stage 2, recommenders. Takes a Dataset and Split; produces a trained BPR-MF, LightGCN or SASRec behind one
interface (represent -> h, score), its evaluation, and the run folder's recommender/ (RunContext reloads it)."""

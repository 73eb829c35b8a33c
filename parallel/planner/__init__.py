"""Layout planner: predict memory and throughput of a parallel layout on a described GPU cluster
and search for the fastest layout that fits. Pure computation; see README.md here."""
from .cluster import ClusterProfile, load_cluster
from .layout import Layout, Stack, megatron_sc21
from .predict import Prediction, predict
from .search import search

__all__ = ["ClusterProfile", "Layout", "Prediction", "Stack", "load_cluster", "megatron_sc21", "predict", "search"]

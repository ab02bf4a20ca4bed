"""Online, per-user adaptation: residual learners over a frozen head, slate policies, the simulator."""

from streamml.online.learner import Catalog, PairwiseSGD, PointwiseSGD, ResidualLearner

__all__ = ["Catalog", "PairwiseSGD", "PointwiseSGD", "ResidualLearner"]

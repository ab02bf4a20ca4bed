"""Online, per-user adaptation: residual learners over a frozen head, slate policies, the simulator."""

from streamml.online.learner import ResidualLearner
from streamml.online.rules import Catalog, DiagonalLaplace, PairwiseSGD, PointwiseSGD

__all__ = ["Catalog", "DiagonalLaplace", "PairwiseSGD", "PointwiseSGD", "ResidualLearner"]

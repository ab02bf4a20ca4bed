"""Online, per-user adaptation: residual learners over a frozen head, slate policies, the simulator."""

from streamml.online.learner import ResidualLearner
from streamml.online.rules import Catalog, DiagonalLaplace, IsotropicLaplace, PairwiseSGD, PointwiseSGD, WindowMAP

__all__ = ["Catalog", "DiagonalLaplace", "IsotropicLaplace", "PairwiseSGD", "PointwiseSGD", "ResidualLearner", "WindowMAP"]

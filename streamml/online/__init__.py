"""Online, per-user adaptation: residual learners over a frozen head, mixed effects over a population, replay of real logs, slate policies, the simulator."""

from streamml.online.learner import ResidualLearner
from streamml.online.mixed import MixedLearner
from streamml.online.rules import Catalog, DiagonalLaplace, IsotropicLaplace, PairwiseSGD, PointwiseSGD, WindowMAP

__all__ = ["Catalog", "DiagonalLaplace", "IsotropicLaplace", "MixedLearner", "PairwiseSGD", "PointwiseSGD", "ResidualLearner", "WindowMAP"]

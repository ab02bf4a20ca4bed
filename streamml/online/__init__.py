"""Online, per-user adaptation: residual learners over a frozen head, mixed effects over a
population, slate policies, the simulator and the replay of real logs."""

from streamml.online.learner import ResidualLearner
from streamml.online.mixed import MixedLearner
from streamml.online.rules import Catalog, DiagonalLaplace, IsotropicLaplace, PairwiseSGD, PointwiseSGD, WindowMAP

__all__ = ["Catalog", "DiagonalLaplace", "IsotropicLaplace", "MixedLearner", "PairwiseSGD", "PointwiseSGD", "ResidualLearner", "WindowMAP"]

"""Meta-learning algorithms as pure functions over parameter dicts."""

from reptile.algorithms.base import Algorithm, MetaStep
from reptile.algorithms.fomaml import FOMAML
from reptile.algorithms.inner_loop import InnerLoop
from reptile.algorithms.maml import MAML
from reptile.algorithms.reptile import Reptile

__all__ = ["FOMAML", "MAML", "Algorithm", "InnerLoop", "MetaStep", "Reptile"]

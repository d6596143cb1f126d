"""Meta-learning algorithms as pure functions over parameter dicts."""

from reptile.algorithms.anil import ANIL
from reptile.algorithms.base import Algorithm, MetaStep
from reptile.algorithms.fomaml import FOMAML
from reptile.algorithms.inner_loop import InnerLoop
from reptile.algorithms.maml import MAML
from reptile.algorithms.meta_sgd import MetaSGD
from reptile.algorithms.reptile import Reptile

__all__ = ["ANIL", "FOMAML", "MAML", "Algorithm", "InnerLoop", "MetaSGD", "MetaStep", "Reptile"]

"""Meta-learning algorithms as pure functions over parameter dicts."""

from reptile.algorithms.base import Algorithm, MetaStep
from reptile.algorithms.inner_loop import InnerLoop
from reptile.algorithms.reptile import Reptile

__all__ = ["Algorithm", "InnerLoop", "MetaStep", "Reptile"]

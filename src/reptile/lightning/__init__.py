"""Lightning glue: the module, its metrics and callbacks."""

from reptile.lightning.module import DivergenceError, MetaLearner

__all__ = ["DivergenceError", "MetaLearner"]

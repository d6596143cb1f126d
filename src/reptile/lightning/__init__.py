"""Lightning glue: the module, its metrics and callbacks."""

from reptile.lightning.module import MetaLearner

__all__ = ["MetaLearner"]

"""Meta-train and evaluate: `python train.py [overrides]`, `python train.py -m [sweep]`."""

import sys

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    from reptile.config import ConfigValueError
    from reptile.lightning.module import DivergenceError
    from reptile.train import run

    try:
        return run(cfg)
    except ConfigValueError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except DivergenceError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(3)


if __name__ == "__main__":
    main()

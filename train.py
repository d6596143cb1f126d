"""Meta-train and evaluate: `python train.py [overrides]`, `python train.py -m [sweep]`.

Exit codes (`reptile/cli.py`): 0 done, 1 unexpected error, 2 bad input, 3 diverged, 130 / 143
stopped by SIGINT / SIGTERM (a checkpoint is saved and the resume command printed).
"""

from pathlib import Path

import hydra
from omegaconf import DictConfig

from reptile.cli import (  # also registers the resolvers
    reporting_config_errors,
    reporting_interruption,
    stop_request,
)


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    stop_request.install()
    with reporting_interruption():
        from reptile.job import run_job  # torch after Hydra's own work, Lightning after the checks

        return run_job(cfg)


if __name__ == "__main__":
    with reporting_config_errors(Path(__file__).parent / "conf"):
        main()

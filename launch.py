"""Entry point: `python launch.py [hydra overrides]`, or `python launch.py -m ...` for sweeps."""
import hydra
from omegaconf import DictConfig

from train.config import register_configs

register_configs()


@hydra.main(config_path="configs", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from train.run import main as run_main

    run_main(cfg)


if __name__ == "__main__":
    import os
    import sys

    if "RANK" not in os.environ:  # ranks re-read a launch that was checked before they started
        from train.preflight import main as preflight

        preflight(sys.argv[1:])
    main()
    from train.run import exit_if_jobs_failed

    exit_if_jobs_failed()

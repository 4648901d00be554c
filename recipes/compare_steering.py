"""AC-SFT attributes vs activation steering vs both, on the same prompts: one table, with the utility cost.

    python recipes/compare_steering.py                           # verbosity, runs/sft/model, runs/steering/vectors
    python recipes/compare_steering.py layer=20 'coefficients=[-4,-2,0,2,4]' positions=generated

The stage itself lives in steerlm.stages.steer_compare; this file only wires Hydra to it.
"""

import hydra
from omegaconf import DictConfig

from steerlm import cli
from steerlm.stages import steer_compare


@hydra.main(config_path="../conf", config_name="compare_steering", version_base="1.3")
@cli.stage_entry
def main(cfg: DictConfig) -> None:
    steer_compare.run(cfg)


if __name__ == "__main__":
    cli.main(main)

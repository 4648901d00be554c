"""PPO: the stage-3 policy trained against the multi-attribute RM collapsed to one scalar reward.

    python recipes/train_ppo.py                                   # CPU-sized: 8 steps x 8 prompts

The stage lives in steerlm.stages.ppo (math: steerlm.ppo_math); this file only wires Hydra to it.
"""

import hydra
from omegaconf import DictConfig

from steerlm import cli
from steerlm.stages import ppo


@hydra.main(config_path="../conf", config_name="ppo", version_base="1.3")
@cli.stage_entry
def main(cfg: DictConfig) -> None:
    ppo.run(cfg)


if __name__ == "__main__":
    cli.main(main)

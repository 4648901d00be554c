"""Stage 1: train the multi-attribute reward model.

    python recipes/train_reward.py                                   # embedded default, CPU
    python recipes/train_reward.py model=tiny_llama train.epochs=1   # seconds, for smoke tests
    torchrun --nproc_per_node 2 recipes/train_reward.py engine.strategy=fsdp2 model.freeze_backbone=false

The stage itself lives in steerlm.stages.reward; this file only wires Hydra to it.
"""

import hydra
from omegaconf import DictConfig

from steerlm import cli
from steerlm.stages import reward


@hydra.main(config_path="../conf", config_name="reward", version_base="1.3")
@cli.stage_entry
def main(cfg: DictConfig) -> None:
    reward.run(cfg)


if __name__ == "__main__":
    cli.main(main)

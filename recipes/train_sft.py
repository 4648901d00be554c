"""Stage 3: attribute-conditioned SFT.

    python recipes/train_sft.py                                   # embedded default, CPU
    python recipes/train_sft.py model=tiny_llama train.max_steps=5  # seconds, for smoke tests
    torchrun --nproc_per_node 2 recipes/train_sft.py engine.strategy=fsdp2 model.lora.enabled=false

The stage itself lives in steerlm.stages.sft; this file only wires Hydra to it.
"""

import hydra
from omegaconf import DictConfig

from steerlm import cli
from steerlm.stages import sft


@hydra.main(config_path="../conf", config_name="sft", version_base="1.3")
@cli.stage_entry
def main(cfg: DictConfig) -> None:
    sft.run(cfg)


if __name__ == "__main__":
    cli.main(main)

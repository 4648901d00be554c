"""Stage 1: train the multi-attribute reward model.

    python recipes/train_reward.py                                   # embedded default, CPU
    python recipes/train_reward.py model=tiny_llama train.epochs=1   # seconds, for smoke tests
    torchrun --nproc_per_node 2 recipes/train_reward.py engine.strategy=fsdp2 model.freeze_backbone=false

This file is an alias of `steerlm train-reward` (steerlm.cli), kept for checkouts and slurm/.
"""

import sys

from steerlm.cli import run_command

if __name__ == "__main__":
    run_command("train-reward", sys.argv[1:])

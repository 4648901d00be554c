"""PPO: the stage-3 policy trained against the multi-attribute RM collapsed to one scalar reward.

    python recipes/train_ppo.py                                   # CPU-sized: 8 steps x 8 prompts

This file is an alias of `steerlm train-ppo` (steerlm.cli), kept for checkouts and slurm/.
"""

import sys

from steerlm.cli import run_command

if __name__ == "__main__":
    run_command("train-ppo", sys.argv[1:])

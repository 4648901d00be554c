"""Stage 3: attribute-conditioned SFT.

    python recipes/train_sft.py                                   # embedded default, CPU
    python recipes/train_sft.py model=tiny_llama train.max_steps=5  # seconds, for smoke tests
    torchrun --nproc_per_node 2 recipes/train_sft.py engine.strategy=fsdp2 model.lora.enabled=false

This file is an alias of `steerlm train-sft` (steerlm.cli), kept for checkouts and slurm/.
"""

import sys

from steerlm.cli import run_command

if __name__ == "__main__":
    run_command("train-sft", sys.argv[1:])

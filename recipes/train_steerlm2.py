"""SteerLM 2.0: sample from the stage-3 policy, weight by the RM, train with the listwise loss, iterate.

    python recipes/train_steerlm2.py                              # CPU-sized: 32 prompts x 4 samples, one iteration
    python recipes/train_steerlm2.py iterations=2 n_samples=10 train.epochs=2
    python recipes/train_steerlm2.py data_file=my_steerlm2.jsonl  # NeMo-Aligner SteerLM2Dataset JSONL

This file is an alias of `steerlm train-steerlm2` (steerlm.cli), kept for checkouts and slurm/.
"""

import sys

from steerlm.cli import run_command

if __name__ == "__main__":
    run_command("train-steerlm2", sys.argv[1:])

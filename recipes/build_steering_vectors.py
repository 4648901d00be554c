"""Attribute steering vectors from stage-2 labels, for a stage-3 model.

    python recipes/build_steering_vectors.py                     # verbosity, every layer of runs/sft/model
    python recipes/build_steering_vectors.py 'attributes=[verbosity,humor]' 'layers=[15,20]'

This file is an alias of `steerlm build-steering-vectors` (steerlm.cli), kept for checkouts and slurm/.
"""

import sys

from steerlm.cli import run_command

if __name__ == "__main__":
    run_command("build-steering-vectors", sys.argv[1:])

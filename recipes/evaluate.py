"""Stage 3: steerability evaluation of an attribute-conditioned SFT model, measured by the stage-1 RM.

    python recipes/evaluate.py                                   # runs/sft/model rated by runs/reward/model
    python recipes/evaluate.py 'attributes=[verbosity]' n_prompts=32

This file is an alias of `steerlm evaluate` (steerlm.cli), kept for checkouts and slurm/.
"""

import sys

from steerlm.cli import run_command

if __name__ == "__main__":
    run_command("evaluate", sys.argv[1:])

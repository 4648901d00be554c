"""AC-SFT attributes vs activation steering vs both, on the same prompts: one table, with the utility cost.

    python recipes/compare_steering.py                           # verbosity, runs/sft/model, runs/steering/vectors
    python recipes/compare_steering.py layer=20 'coefficients=[-4,-2,0,2,4]' positions=generated

This file is an alias of `steerlm compare-steering` (steerlm.cli), kept for checkouts and slurm/.
"""

import sys

from steerlm.cli import run_command

if __name__ == "__main__":
    run_command("compare-steering", sys.argv[1:])

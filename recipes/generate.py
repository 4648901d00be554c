"""Stage 3: generate with a steerable (attribute-conditioned SFT) model.

    python recipes/generate.py prompt='Explain DNS.' attributes.verbosity=0
    python recipes/generate.py prompts_file=prompts.txt output=runs/gen/out.jsonl generation.do_sample=true

The stage itself lives in steerlm.stages.generate (also the Python API: SteerableModel); this file only
wires Hydra to it.

This file is an alias of `steerlm generate` (steerlm.cli), kept for checkouts and slurm/.
"""

import sys

from steerlm.cli import run_command

if __name__ == "__main__":
    run_command("generate", sys.argv[1:])

"""Stage 2: label any chat dataset with the stage-1 attribute reward model.

    python recipes/label.py                                   # bundled OASST with runs/reward/model
    torchrun --nproc_per_node 2 recipes/label.py              # sharded; byte-identical output
    python recipes/label.py output_format=parquet overwrite=true

This file is an alias of `steerlm label` (steerlm.cli), kept for checkouts and slurm/.
"""

import sys

from steerlm.cli import run_command

if __name__ == "__main__":
    run_command("label", sys.argv[1:])

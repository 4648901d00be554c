"""The whole SteerLM pipeline in one command: reward -> label -> sft -> evaluate, then report.md/.html.

    python recipes/pipeline.py                                   # embedded default, ~52 min on 2 CPU cores
    python recipes/pipeline.py sft.optim.lr=1e-4                 # skips reward and label, re-runs sft + evaluate
    python recipes/pipeline.py model=tiny_llama run_dir=runs/pipeline_tiny   # seconds, for smoke tests
    torchrun --nproc_per_node 8 recipes/pipeline.py sft.engine.strategy=fsdp2

Planning, skipping and resuming live in steerlm.pipeline, the report in steerlm.report.

This file is an alias of `steerlm pipeline` (steerlm.cli), kept for checkouts and slurm/.
"""

import sys

from steerlm.cli import run_command

if __name__ == "__main__":
    run_command("pipeline", sys.argv[1:])

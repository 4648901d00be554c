"""OpenAI-compatible chat-completions server with per-request attributes and activation steering.

    python recipes/serve.py                                       # runs/sft/model on 127.0.0.1:8000
    python recipes/serve.py vectors=runs/steering/vectors port=8080

This file is an alias of `steerlm serve` (steerlm.cli), kept for checkouts and slurm/.
"""

import sys

from steerlm.cli import run_command

if __name__ == "__main__":
    run_command("serve", sys.argv[1:])

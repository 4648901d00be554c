"""OpenAI-compatible chat-completions server with per-request attributes and activation steering.

    python recipes/serve.py                                       # runs/sft/model on 127.0.0.1:8000
    python recipes/serve.py vectors=runs/steering/vectors port=8080

The server itself lives in steerlm.stages.serve; this file only wires Hydra to it.
"""

import hydra
from omegaconf import DictConfig

from steerlm import cli
from steerlm.stages import serve


@hydra.main(config_path="../conf", config_name="serve", version_base="1.3")
@cli.stage_entry
def main(cfg: DictConfig) -> None:
    serve.run(cfg)


if __name__ == "__main__":
    cli.main(main)

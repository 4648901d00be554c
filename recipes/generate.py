"""Stage 3: generate with a steerable (attribute-conditioned SFT) model.

    python recipes/generate.py prompt='Explain DNS.' attributes.verbosity=0
    python recipes/generate.py prompts_file=prompts.txt output=runs/gen/out.jsonl generation.do_sample=true

The stage itself lives in steerlm.stages.generate (also the Python API: SteerableModel); this file only
wires Hydra to it.
"""

import hydra
from omegaconf import DictConfig

from steerlm import cli
from steerlm.stages import generate


@hydra.main(config_path="../conf", config_name="generate", version_base="1.3")
@cli.stage_entry
def main(cfg: DictConfig) -> None:
    generate.run(cfg)


if __name__ == "__main__":
    cli.main(main)

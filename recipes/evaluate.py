"""Stage 3: steerability evaluation of an attribute-conditioned SFT model, measured by the stage-1 RM.

    python recipes/evaluate.py                                   # runs/sft/model rated by runs/reward/model
    python recipes/evaluate.py 'attributes=[verbosity]' n_prompts=32

The stage itself lives in steerlm.stages.evaluate; this file only wires Hydra to it.
"""

import hydra
from omegaconf import DictConfig

from steerlm import cli
from steerlm.stages import evaluate


@hydra.main(config_path="../conf", config_name="evaluate", version_base="1.3")
@cli.stage_entry
def main(cfg: DictConfig) -> None:
    evaluate.run(cfg)


if __name__ == "__main__":
    cli.main(main)

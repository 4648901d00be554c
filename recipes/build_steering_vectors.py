"""Attribute steering vectors from stage-2 labels, for a stage-3 model.

    python recipes/build_steering_vectors.py                     # verbosity, every layer of runs/sft/model
    python recipes/build_steering_vectors.py 'attributes=[verbosity,humor]' 'layers=[15,20]'

The stage itself lives in steerlm.stages.steering_vectors; this file only wires Hydra to it.
"""

import hydra
from omegaconf import DictConfig

from steerlm import cli
from steerlm.stages import steering_vectors


@hydra.main(config_path="../conf", config_name="steering_vectors", version_base="1.3")
@cli.stage_entry
def main(cfg: DictConfig) -> None:
    steering_vectors.run(cfg)


if __name__ == "__main__":
    cli.main(main)

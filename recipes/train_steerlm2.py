"""SteerLM 2.0: sample from the stage-3 policy, weight by the RM, train with the listwise loss, iterate.

    python recipes/train_steerlm2.py                              # CPU-sized: 32 prompts x 4 samples, one iteration
    python recipes/train_steerlm2.py iterations=2 n_samples=10 train.epochs=2
    python recipes/train_steerlm2.py data_file=my_steerlm2.jsonl  # NeMo-Aligner SteerLM2Dataset JSONL

The stage lives in steerlm.stages.steerlm2 (math: steerlm.steerlm2_math); this file only wires Hydra to it.
"""

import hydra
from omegaconf import DictConfig

from steerlm import cli
from steerlm.stages import steerlm2


@hydra.main(config_path="../conf", config_name="steerlm2", version_base="1.3")
@cli.stage_entry
def main(cfg: DictConfig) -> None:
    steerlm2.run(cfg)


if __name__ == "__main__":
    cli.main(main)

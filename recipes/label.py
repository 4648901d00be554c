"""Stage 2: label any chat dataset with the stage-1 attribute reward model.

    python recipes/label.py                                   # bundled OASST with runs/reward/model
    torchrun --nproc_per_node 2 recipes/label.py              # sharded; byte-identical output
    python recipes/label.py output_format=parquet overwrite=true

The stage itself lives in steerlm.stages.label; this file only wires Hydra to it.
"""

import hydra
from omegaconf import DictConfig

from steerlm import cli
from steerlm.stages import label


@hydra.main(config_path="../conf", config_name="label", version_base="1.3")
@cli.stage_entry
def main(cfg: DictConfig) -> None:
    label.run(cfg)


if __name__ == "__main__":
    cli.main(main)

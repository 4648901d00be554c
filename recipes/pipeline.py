"""The whole SteerLM pipeline in one command: reward -> label -> sft -> evaluate, then report.md/.html.

    python recipes/pipeline.py                                   # embedded default, ~20 min on 2 CPU cores
    python recipes/pipeline.py sft.optim.lr=1e-4                 # skips reward and label, re-runs sft + evaluate
    python recipes/pipeline.py model=tiny_llama run_dir=runs/pipeline_tiny   # seconds, for smoke tests
    torchrun --nproc_per_node 8 recipes/pipeline.py sft.engine.strategy=fsdp2

Planning, skipping and resuming live in steerlm.pipeline, the report in steerlm.report.
"""

import hydra
from omegaconf import DictConfig

from steerlm import cli, pipeline


@hydra.main(config_path="../conf", config_name="pipeline", version_base="1.3")
@cli.stage_entry
def main(cfg: DictConfig) -> None:
    pipeline.run(cfg)


if __name__ == "__main__":
    cli.main(main)

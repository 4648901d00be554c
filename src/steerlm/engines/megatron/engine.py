"""What a training stage needs from engine=megatron: process groups and the data-parallel view (gradient sync
and clipping across tensor-parallel shards: .grads).

Ranks: world = DP x PP x TP. The stages shard data by the DistInfo they get, so under Megatron that DistInfo is
the data-parallel view (rank = DP rank, world_size = DP size): the TP ranks of one replica read the same
samples. Files are written by global rank 0 only (`is_main`).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .. import torch_engine as te


@dataclass
class MegatronDistInfo(te.DistInfo):
    global_rank: int = 0
    tp: int = 1
    tp_rank: int = 0
    pp: int = 1
    pp_rank: int = 0
    sequence_parallel: bool = False

    @property
    def is_main(self) -> bool:
        return self.global_rank == 0


@contextlib.contextmanager
def distributed(engine_cfg):
    """Megatron's TP/PP/DP groups for one stage (torchrun env), torn down on exit; the process group too when it
    was started here (a pipeline run keeps its own across stages)."""
    from megatron.core import parallel_state as ps

    from .model import init_parallel

    tp, pp = int(engine_cfg.get("tensor_parallel", 1)), int(engine_cfg.get("pipeline_parallel", 1))
    sp = bool(engine_cfg.get("sequence_parallel", False)) and tp > 1  # nothing to split at TP 1
    owned = not dist.is_initialized()
    if ps.model_parallel_is_initialized():  # left by someone else: this stage's TP x PP may differ
        ps.destroy_model_parallel()
    ranks = init_parallel(tp, pp)
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu")
    info = MegatronDistInfo(rank=ranks["dp_rank"], world_size=ranks["dp_size"], local_rank=local, device=device,
                            global_rank=dist.get_rank(), tp=tp, tp_rank=ranks["tp_rank"], pp=pp,
                            pp_rank=ranks["pp_rank"], sequence_parallel=sp)
    te.set_data_group(ps.get_data_parallel_group())
    try:
        yield info
    finally:
        te.set_data_group(None)
        ps.destroy_model_parallel()  # the pipeline's next stage may use another split, or the torch engine
        if owned:
            te.shutdown_distributed()


# gradient sync and clipping live in .grads (the models call them without importing this module)

"""Test-only launcher: a recipe's CLI with megatron-core redirected to the CPU (tests/megatron_cpu.py).

    torchrun --nproc_per_node 2 tests/megatron_recipe.py train_reward engine=megatron engine.tensor_parallel=2 ...
"""

import runpy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import megatron_cpu  # noqa: E402

megatron_cpu.install()
recipe = Path(__file__).resolve().parents[1] / "recipes" / f"{sys.argv[1]}.py"
sys.argv = [str(recipe), *sys.argv[2:]]
runpy.run_path(str(recipe), run_name="__main__")

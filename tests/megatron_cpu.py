"""Test-only: run megatron-core on CPU (gloo) by redirecting its CUDA-only calls. Never imported by the library.

megatron-core hard-codes CUDA at ~10 call sites (RoPE's inv_freq, the attention memory buffer, the CUDA RNG
tracker, `device="cuda"` in the pipeline schedules; ../shared/research/stack_feasibility.md §2). The redirect
is scoped to megatron's own modules: each imported `megatron.*` module's global `torch` is swapped for a proxy
whose `torch.cuda` answers for the CPU and whose tensor factories map device "cuda" to "cpu". torch itself is
not patched: a global patch of the factories corrupted HF models loaded in the same process (measured).
"""

from __future__ import annotations

import contextlib
import importlib
import sys
import types

import torch

_FACTORIES = ("zeros", "ones", "empty", "tensor", "full", "arange", "randn", "rand", "zeros_like", "empty_like")


def _cpu_device(device):
    if device is None:
        return None
    d = torch.device(device) if not isinstance(device, int) else torch.device("cpu")
    return torch.device("cpu") if d.type == "cuda" else d


class _Stream:
    def wait_event(self, *a, **k): pass
    def wait_stream(self, *a, **k): pass
    def synchronize(self): pass
    def record_event(self, *a, **k): return None


class _CudaOnCpu(types.ModuleType):
    """`torch.cuda` as megatron sees it: the current device is the CPU, RNG state is the CPU generator's."""

    def __init__(self):
        super().__init__("torch.cuda(cpu)")

    def __getattr__(self, name):
        return getattr(torch.cuda, name)

    current_device = staticmethod(lambda: torch.device("cpu"))
    synchronize = staticmethod(lambda *a, **k: None)
    current_stream = staticmethod(lambda *a, **k: _Stream())
    default_stream = staticmethod(lambda *a, **k: _Stream())
    stream = staticmethod(lambda *a, **k: contextlib.nullcontext())
    get_rng_state = staticmethod(lambda *a, **k: torch.get_rng_state())
    set_rng_state = staticmethod(lambda state, *a, **k: torch.set_rng_state(state))
    manual_seed = staticmethod(lambda seed: None)
    device_count = staticmethod(lambda: 0)
    empty_cache = staticmethod(lambda: None)


class _TorchForMegatron(types.ModuleType):
    def __init__(self):
        super().__init__("torch(megatron-cpu)")
        self.cuda = _CudaOnCpu()
        for name in _FACTORIES:
            setattr(self, name, self._factory(getattr(torch, name)))

    @staticmethod
    def _factory(fn):
        def call(*args, **kwargs):
            if "device" in kwargs:
                kwargs["device"] = _cpu_device(kwargs["device"])
            kwargs.pop("pin_memory", None)
            return fn(*args, **kwargs)
        return call

    def __getattr__(self, name):
        return getattr(torch, name)


_MODULES = ["megatron.core", "megatron.core.parallel_state", "megatron.core.tensor_parallel",
            "megatron.core.tensor_parallel.random", "megatron.core.tensor_parallel.layers",
            "megatron.core.tensor_parallel.cross_entropy", "megatron.core.tensor_parallel.mappings",
            "megatron.core.models.gpt", "megatron.core.models.gpt.gpt_model", "megatron.core.models.gpt.gpt_layer_specs",
            "megatron.core.models.common.embeddings.rotary_pos_embedding", "megatron.core.transformer.dot_product_attention",
            "megatron.core.transformer.attention", "megatron.core.transformer.transformer_block",
            "megatron.core.pipeline_parallel.schedules", "megatron.core.pipeline_parallel.p2p_communication",
            "megatron.core.utils", "megatron.core.optimizer", "megatron.core.distributed",
            "megatron.core.models.common.language_module.language_module"]
_installed = False


def install() -> None:
    """Import megatron's modules, then point their global `torch` at the CPU proxy (idempotent)."""
    global _installed
    if _installed:
        return
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Transformer Engine and Apex are not installed": expected here
        for name in _MODULES:
            importlib.import_module(name)
    proxy = _TorchForMegatron()
    for name, mod in list(sys.modules.items()):
        if name.startswith("megatron.") and getattr(mod, "torch", None) is torch:
            mod.torch = proxy
    # PP > 1 with tied embeddings: LanguageModule moves the last stage's embedding copy with `Tensor.cuda()` before
    # its all-reduce; a method, not a module global, so it is made a no-op for the duration of that one call only
    lm = sys.modules["megatron.core.models.common.language_module.language_module"].LanguageModule
    setup = lm.setup_embeddings_and_output_layer

    def setup_on_cpu(self, *args, **kwargs):
        saved, torch.Tensor.cuda = torch.Tensor.cuda, lambda t, *a, **k: t
        try:
            return setup(self, *args, **kwargs)
        finally:
            torch.Tensor.cuda = saved

    lm.setup_embeddings_and_output_layer = setup_on_cpu
    random = sys.modules["megatron.core.tensor_parallel.random"]
    random._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    random._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    _installed = True

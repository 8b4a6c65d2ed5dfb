"""effc: a torch.compile backend that makes models cheaper to run by rewriting them.

    compiled = torch.compile(model, backend="effc", options={"debug_dir": "effc_debug"})

The backend is registered through the `torch_dynamo_backends` entry point, so
`backend="effc"` works without importing this package once it is installed; importing it
registers the backend too (a checkout on PYTHONPATH has no entry point).
"""

from effc.compiler.backend import reset, session_report as report
from effc.compiler.calibration import Calibration, calibrate
from effc.compiler.config import Config
from effc.compiler.explain import explain
from effc.compiler.report import Report
from effc.compiler.verify import verify_model as verify
from effc.kernels.phm import phm_linear
from effc.kernels.shift import shift_linear
from effc.passes.hypercomplex import HypercomplexConfig
from effc.passes.kv_proj import KVProjConfig
from effc.passes.low_rank import LowRankConfig
from effc.passes.shift_add import ShiftAddConfig
from effc.passes.token_skip import TokenSkipConfig

__version__ = "0.1.0"


def _register_backend() -> None:
    """Register the backend where no installed entry point names it (reading the entry
    points costs ~3 ms; asking Dynamo for its backends would import them all, ~150 ms)."""
    import importlib.metadata

    if "effc" not in importlib.metadata.entry_points(group="torch_dynamo_backends").names:
        import torch._dynamo

        from effc.compiler.backend import effc_backend as backend

        torch._dynamo.register_backend(backend, name="effc")


_register_backend()
__all__ = ["Calibration", "Config", "HypercomplexConfig", "KVProjConfig", "LowRankConfig",
           "ProjectedCache", "Report", "calibrate", "explain", "kv_cache", "phm_linear", "report",
           "reset", "restore_attention", "ShiftAddConfig", "shift_linear", "TokenSkipConfig",
           "use_select_attention", "verify"]
# These import transformers, so they load on first use.
_LAZY = {"kv_cache": "effc.projected_cache", "ProjectedCache": "effc.projected_cache",
         "use_select_attention": "effc.token_select", "restore_attention": "effc.token_select"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'effc' has no attribute {name!r}")

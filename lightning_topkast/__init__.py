"""Top-KAST (Top-K Always Sparse Training) for PyTorch Lightning: one callback, any LightningModule."""

from lightning_topkast.callback import TopKASTCallback
from lightning_topkast.export import SparseExport, load_sparse, save_sparse
from lightning_topkast.planning import Config, Plan, plan
from lightning_topkast.state import TopKAST
from lightning_topkast.targets import Selection

__version__ = "0.1.0"

__all__ = [
    "Config",
    "Plan",
    "Selection",
    "SparseExport",
    "TopKAST",
    "TopKASTCallback",
    "__version__",
    "load_sparse",
    "plan",
    "save_sparse",
]

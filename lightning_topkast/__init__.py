"""Top-KAST (Top-K Always Sparse Training) for PyTorch Lightning: one callback, any LightningModule."""

from lightning_topkast.callback import TopKASTCallback
from lightning_topkast.state import TopKAST

__version__ = "0.1.0"

__all__ = ["TopKAST", "TopKASTCallback", "__version__"]

"""liftkit: lifted, proximal and alternating-minimization training of neural networks on PyTorch.

Quick start::

    import liftkit
    data = liftkit.data.load_dataset("digits")
    model = liftkit.models.mlp("64-32-10")
    method = liftkit.methods.get("adam")(model)
    summary = liftkit.fit(method, data, epochs=5, batch_size=100)

The methods train the given ``nn.Sequential`` in place; inference is its ordinary forward pass. For any other
model in your own training loop, ``liftkit.optim.ProxProp`` is a ``torch.optim``-style optimizer.
"""

from liftkit import data, methods, models, optim, profiling
from liftkit.errors import DataError, DivergenceError, LiftkitError
from liftkit.train import RunSpec, evaluate, fit, run

__version__ = "0.1.0"

__all__ = [
    "DataError",
    "DivergenceError",
    "LiftkitError",
    "RunSpec",
    "__version__",
    "data",
    "evaluate",
    "fit",
    "methods",
    "models",
    "optim",
    "profiling",
    "run",
]

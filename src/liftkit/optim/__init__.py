"""Optimizers in the ``torch.optim`` mould for the user's own training loop.

* :class:`ProxProp`: proximal backpropagation over every Linear and Conv2d of any model (Frerix et al.,
  ICLR 2018), wrapping a ``torch.optim`` base optimizer.
"""

from liftkit.optim.proxprop import LayerStats, ProxProp

__all__ = ["LayerStats", "ProxProp"]

"""genimg: distributed batch image generation for synthetic training datasets.

The package holds the stages (spec and seeds, inference client, imaging,
storage, metrics) and the models; ``workers/`` and ``producer/`` wire them.
"""

from __future__ import annotations

__version__ = "0.1.0"

"""Out-of-core clustering of object embeddings.

Public API: :func:`load_config`, :class:`Config`, :func:`run`, :func:`make_demo_dataset`.
"""

from .config import Config, load_config
from .run import RunResult, run
from .synthetic import make_demo_dataset

__version__ = "0.1.0"
__all__ = ["Config", "RunResult", "load_config", "make_demo_dataset", "run", "__version__"]

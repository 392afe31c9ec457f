"""Writers: where :class:`fastmlp.Monitor` sends each logged snapshot.

One interface (:class:`Writer`: ``write(step, snapshot)``, ``close()``) and a writer per
backend. Each imports its library only when it first writes; each library is an optional
extra (``pip install 'fastmlp[tensorboard]'``, ``[wandb]``, ``[mlflow]``).
"""

from fastmlp.writers.base import Writer, figures, histograms, scalars
from fastmlp.writers.jsonl import JSONL
from fastmlp.writers.mlflow import MLflow
from fastmlp.writers.tensorboard import TensorBoard
from fastmlp.writers.wandb import Wandb

__all__ = ["JSONL", "MLflow", "TensorBoard", "Wandb", "Writer", "figures", "histograms", "scalars"]

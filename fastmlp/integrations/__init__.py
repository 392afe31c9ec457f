"""Callbacks for the trainers people use: :mod:`fastmlp.integrations.lightning`
(``StatsMonitor``) and :mod:`fastmlp.integrations.transformers` (``StatsCallback``).

Import the submodule you need; each imports its library (an optional extra:
``pip install 'fastmlp[lightning]'``, ``'fastmlp[transformers]'``).
"""

"""A small Hydra sweeper around Optuna's ask-and-tell interface (Optuna 4 and later).

The released ``hydra-optuna-sweeper`` pins Optuna below 3. This plugin keeps its
configuration layout (``hydra.sweeper.params`` in Hydra's override grammar, ``direction``,
``n_trials``, ``n_jobs``, ``sampler``, ``storage``, ``study_name``) so the search configs
read like lightning-hydra-template's, and selects it with ``override /hydra/sweeper: optuna``.
"""

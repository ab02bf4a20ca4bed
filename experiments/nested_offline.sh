#!/usr/bin/env bash
# Nested-CV comparison on the shared data: Optuna searches over the multi-task head, the
# linear/MLP heads and sklearn LR's C, plus the river pipeline, all choosing on inner folds
# (objective tuning_auc) inside 5 outer folds; then the report.
#   bash experiments/nested_offline.sh            (from the repository root)
# Writes experiments/nested_offline.md and .png. DATA, MLFLOW_TRACKING_URI and OPTUNA_DB override the defaults.
set -euo pipefail
DATA=${DATA:-../shared/data/queries}
export MLFLOW_TRACKING_URI=${MLFLOW_TRACKING_URI:-sqlite:///mlflow.db}
OPTUNA_DB=${OPTUNA_DB:-sqlite:///optuna.db}
COMMON=(name=nested_offline "data.dir=$DATA" cv.nested=true cv.n_repeats=1 cv.inner_folds=3 objective=tuning_auc final_fit=false)
SEARCH=("${COMMON[@]}" "hydra.sweeper.storage=$OPTUNA_DB")
python -m streamml.train learner=river_stack "${COMMON[@]}" trainer.enable_progress_bar=false  # also creates the MLflow store
python -m streamml.train -m hparams_search=multitask "${SEARCH[@]}" hydra.sweeper.study_name=multitask hydra.sweeper.n_trials=16 &
python -m streamml.train -m hparams_search=sklearn_lr "${SEARCH[@]}" hydra.sweeper.study_name=sklearn_lr hydra.sweeper.n_trials=12 hydra.launcher.n_jobs=1
python -m streamml.train -m hparams_search=offline_heads "${SEARCH[@]}" hydra.sweeper.study_name=heads hydra.sweeper.n_trials=16
wait
python -m streamml.report nested_offline --out experiments/nested_offline.md --command "bash experiments/nested_offline.sh" \
    --title "Nested CV on the shared queries: multi-task, linear and MLP heads vs tuned LR and river"

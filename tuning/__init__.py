"""Hyperparameter sweeps: Ray Tune over Ray Train runs, tracked in MLflow.

- `tuning.config`: `SweepConfig` (a base `TrainConfig` and a search space over its
  dotted field paths), validated before anything runs (`validate_sweep`, `load_sweep`).
- `tuning.stoppers`: the collapse rule and its Tune stopper.
- `tuning.driver`: `run_sweep`, the Tuner over TorchTrainer trial drivers.
- `tuning.report`: trial records read back from MLflow, the best trial, the report.
- `tuning.run`: ``python -m tuning.run SWEEP``, the sweep job's entry point.
"""

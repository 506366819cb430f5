"""Running the training loop on a Ray cluster: one module per responsibility.

- `environment`: Ray's environment (`ensure_ray_env`), connecting, the Train V2 check.
- `cluster`: where the workers go (`plan_placement`) and whether they ever fit.
- `storage`: the checkpoint storage (local, shared or ``s3://``), checked writable.
- `worker`: the body of every Ray Train worker (`worker_main`) and its report hooks.
- `launcher`: the one launcher of a `TorchTrainer` (`fit_run`), used by a training
  job (`launch_training`) and by every sweep trial (`tuning.driver`).

Nothing here has side effects at import. Entry points call `ensure_ray_env` before they
import Ray (or anything that does).
"""

"""Running sweeps: the store (Optuna storages, leases), the worker, planning and running workers on
this host, Slurm, sampled search, W&B agents."""

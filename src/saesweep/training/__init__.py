"""Training packs of SAEs: the trainer, its optimiser, dead-feature resampling, and
:func:`.run.run` / :func:`.run.run_pack` (train, evaluate, save)."""

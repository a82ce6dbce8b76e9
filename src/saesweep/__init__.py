"""saesweep: train sparse autoencoders on language-model activations and sweep them."""

from saesweep.version import __version__


def __getattr__(name: str):
    # keep `import saesweep` light; the heavy parts load on first use
    if name in ("run", "run_pack", "RunResult"):
        from saesweep.training import run as experiment

        return getattr(experiment, name)
    if name in ("ExperimentConfig", "load_config", "parse_config", "ConfigError"):
        from saesweep.config import experiment as config

        return getattr(config, name)
    if name in ("load_sae", "load_sae_pack"):
        from saesweep import export

        return getattr(export, name)
    raise AttributeError(name)


__all__ = ["run", "run_pack", "RunResult", "load_sae", "load_sae_pack", "ExperimentConfig", "load_config", "parse_config", "ConfigError", "__version__"]

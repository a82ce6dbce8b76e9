#!/usr/bin/env python
"""Approach 4: a W&B sweep from the sweep spec's grid (saesweep wandb-sweep).

    python scripts/setup_wandb_sweep.py --sae_type relu --project tinystories-sweeps --create_agent_script

writes scripts/wandb_sweep_relu.yaml (the W&B sweep config, built from the same grid every
other front end uses) and scripts/sweep_agent_relu.py (the program `wandb agent` runs), then
creates the sweep when this machine is logged in to W&B -- or prints the exact
`wandb sweep` / `wandb agent` commands when it is not. A thin shim over the `saesweep` command.
"""

from _shim import run

if __name__ == "__main__":
    run("wandb-sweep")

"""What a finished (or running) sweep shows: its results table, the HTML report with Pareto plots,
hyperparameter importance."""

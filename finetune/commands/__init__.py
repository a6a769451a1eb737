"""The command line and what each subcommand does: train, inspect, lr-find, eval, predict, export,
sweep summaries, and the Hydra callbacks of a sweep."""

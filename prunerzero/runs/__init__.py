"""Run infrastructure that both searches (evolve, darwin) and `apply` use: run folders and their
checkpoints (data only, checksummed), locks so one process writes a folder, outputs saved whole
or not at all, and the worker pools that evaluate candidates. Nothing here imports a search."""

"""Pruning methods: each exposes prune(model, tokens, config, adapter) -> PruningPlan."""

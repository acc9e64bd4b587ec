"""The one training loop, optimiser groups, schedules and checkpoints."""

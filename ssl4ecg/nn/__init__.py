"""Shared neural-network building blocks every method may use."""

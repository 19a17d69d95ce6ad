"""Shared test helpers: tiny assets, batches, independent references, Hypothesis strategies, the device list and
the training-subprocess runner. Tests import these; no test imports another test."""

"""Serving: an OpenAI-compatible HTTP server for one model, dense or pruned (`dartprune serve`)."""

"""Tests of the runtime: loading, models, preprocessing, templates, sessions, the CLI."""

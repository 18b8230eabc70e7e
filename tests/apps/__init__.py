"""Tests of the apps: server, desktop app, camera pipeline, Jetson tools."""

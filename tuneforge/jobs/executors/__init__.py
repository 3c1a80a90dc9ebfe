"""Executors run TrainSpecs: local (a child process), fake (a scripted run for tests); see registry."""

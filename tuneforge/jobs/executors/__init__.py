"""Executors run TrainSpecs: local (a child process), ray (a Ray job on a cluster), fake (a scripted run for
tests); see registry."""

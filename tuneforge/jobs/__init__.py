"""Fine-tune jobs: states, the queue, the worker and the executors that run training processes."""

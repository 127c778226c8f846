"""The run core: tasks and data, models, the teacher and its caches, losses, training, evaluation.

Nothing in here names a method: what a method needs from the core comes in as arguments.
"""

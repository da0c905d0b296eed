"""Celery plumbing: the embedded broker, the app and its queues, the tasks, and the ``serve``/``worker`` commands.

What a task *does* lives in ``gate.pipeline``; this package only decides where and when it runs.
"""

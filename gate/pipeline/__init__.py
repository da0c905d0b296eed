"""What happens to a job after the API queues it: train -> audit -> verdict, each stage idempotent.

Each stage claims the job with a lease (``leases``), works, and commits its result together with the
job's next state in one compare-and-set transaction, so a stage that runs twice (a Celery redelivery, a
reaped lease) changes nothing the second time. The Celery tasks in ``gate.worker.tasks`` are thin
wrappers around ``train``, ``audit`` and ``decide`` here.
"""

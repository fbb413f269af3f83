"""The job engine under ``compare``, ``continual`` and ``tune``: one session (device, base model,
evaluation, reuse of finished run folders, tracking) and one recipe for a run's identity."""

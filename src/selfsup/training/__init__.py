"""Training: config dataclasses, the pre-training loop (``loop.pretrain``) and its phases, checkpoints and run folders, optimisers (LARS), schedules, timed runs, trackers, ``--init``, dry runs."""

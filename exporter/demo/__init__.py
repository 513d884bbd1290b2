"""``training-exporter demo``: a real Trainer run on a small synthetic task, with the exporter serving /metrics.

A randomly initialised tiny GPT-2 with a LoRA adapter learns "a+b=c" addition
on the CPU in about a minute, and the Trainer saves checkpoints (which the
analytics exporter can watch). Faults can be injected on purpose to see the
alerts fire, and ``--local-alerting`` runs the project's alerting chain on
loopback and prints each notification.

``task`` is the arithmetic task, ``faults`` and ``injector`` the fault
injection, ``run`` builds and runs the Trainer, ``cli`` is the subcommand and
``localstack`` the local alerting chain. Nothing is imported here, so that
building the command line's parser does not import torch.
"""

"""Experiment drivers: runs that combine training, sampling and metrics into one measured study.

    python -m experiments.sprint_ablation --teacher_workdir=workdirs/tiny --out=workdirs/sprint_ablation
    python -m experiments.one_step_probe --teacher_workdir=workdirs/tiny --out=workdirs/one_step_probe

They sit above the CLIs' layer (docs/architecture.md) and are run from a checkout; sanajax.eval
keeps the metrics they use.
"""

"""kdflow: knowledge-distillation research at cluster scale.

Installed, kdflow is one namespace: ``kdflow.methods`` (pure-PyTorch losses, models and the
distiller registry), ``kdflow.orchestrator`` (studies, jobs, the training runner, results),
``kdflow.launch`` (the command line and the local / SLURM / Ray launchers) and
``kdflow.configs`` (the Hydra configs). In the repository they are the top-level folders
``methods/``, ``orchestrator/``, ``launch/`` and ``configs/``, mapped under ``kdflow`` by
``setup.cfg``'s ``package_dir``, so a user's own ``methods/`` or ``configs/`` cannot shadow
them. Importing ``kdflow`` imports neither torch nor any of those packages.

Every module logs under the ``kdflow`` logger (``kdflow.orchestrator.tracking``...), which
has a :class:`logging.NullHandler` so a library user sees nothing unless they configure logging.
"""
import logging

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())

"""The workdir layer: what a run's folder holds and how to open it.

Above kernels / models / diffusion / data, below training, generation, eval and the CLIs
(docs/architecture.md). `files` names the files, `checkpoint` reads and writes Orbax
checkpoints, `loaders` opens the AE, text encoder and DiT parameters a config or workdir names.
"""

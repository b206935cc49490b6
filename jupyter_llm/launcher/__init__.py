"""Where a run's job goes: the detached supervisor (`supervisor`), its command builders
(`local`, `remote`, `slurm` behind `backends`), and the cluster side (`multinode`, `node`).
Runs are created and started through `jupyter_llm.runs.launch`."""

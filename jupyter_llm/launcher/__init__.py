"""Where a run's job goes: the detached supervisor (`supervisor`) makes the run's attempts
(`attempt`: status, events, stop ladder, hang check, final state), each through its backend's
runner (`runners`: local, ssh, pdsh, Slurm; the cluster ones in `multinode`, the node agent in
`node`) and the command builders behind `backends` (`local`, `remote`, `slurm`), with the nodes'
pre-flight in `probe` and the copies to and from them in `sync`.
Runs are created and started through `jupyter_llm.runs.launch`."""

"""Exit codes shared by the trainer and the launchers, in a module without torch so that rendering
a job script (`meshformer slurm`, `meshformer sweep run --slurm`) does not wait seconds for it."""

# EX_TEMPFAIL in sysexits.h ("temporary failure, retry later"): the trainer saved a complete
# checkpoint because of a signal and stopped; the job script requeues on it (launch/preemption.py).
EXIT_PREEMPTED = 75

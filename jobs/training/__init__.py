"""What runs on a worker: data, the training recipe in named phases, IPT's job-side steps, and the
prompt format training and serving share. Nothing here imports Ray: the recipe talks to the outside
world through a :class:`jobs.training.reporter.Reporter`."""

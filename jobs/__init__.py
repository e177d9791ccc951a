"""Jobs, in three rooms (and no Ray anywhere in them):

* what a job is — ``spec`` (JobSpec), ``sweep_spec``, ``states``, ``base_models``, ``home``;
* where records live — ``jobs.store`` (the db floor, records, registries, artifacts, fingerprints);
* what runs on a worker — ``jobs.training`` (the recipe in named phases, its reporter, data, batches,
  the shared prompt format, IPT's job-side steps).
"""

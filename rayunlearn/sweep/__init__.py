"""The sweep subsystem (``rayunlearn sweep``), one module per step of a trial's way:

- ``driver``    the command and :func:`run_sweep`: space -> preparation -> Tune -> tables; resume
- ``space``     search spaces (YAML, shipped in ``rayunlearn/search_spaces/``), families parsed once
- ``prepare``   the models and reference evaluations a sweep needs, cached per setting
- ``tuner``     Ray, the Tune experiment (Optuna samplers, ConcurrencyLimiter), the aggregator actor
- ``trial``     the Tune function trainable: one trial's config, run and ``result.json``
- ``tables``    ``trials.parquet``, ``pareto.json`` and the printed summary
- ``reaper``    the watchdog that ends a local Ray started by the driver when the driver dies
- ``synthetic`` a closed-form per-trial function for testing and benchmarking the machinery
"""

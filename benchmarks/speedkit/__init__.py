"""Building blocks of ``benchmarks/speed.py``.

- :mod:`.timing`: warm-up, interleaved timed rounds, medians, quartiles and paired ratios;
- :mod:`.memory`: peak memory (a fresh process's ``ru_maxrss``, CUDA's allocator);
- :mod:`.workloads`: the models, inputs and the measured calls;
- :mod:`.cells`: the runs that time and measure each cell (methods, curves, the imputer);
- :mod:`.targets`: the one table of targets and the met / missed / within-noise rule;
- :mod:`.render`: the JSON report and its Markdown tables.
"""

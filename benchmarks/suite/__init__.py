"""The parts of the GPU benchmark suite (``benchmarks/gpu_suite.py``): ``base`` (settings, rows,
optimizers, helpers), one module per group of sections (``step``, ``training``) and ``report``
(goals and tables)."""

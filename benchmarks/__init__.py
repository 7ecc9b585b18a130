"""Speed and memory benchmarks of imaging-meta: learner steps, MAML against `higher`, the data path.

Run them with ``python -m benchmarks.run`` (or ``make bench``); they print Markdown tables and are never
part of ``make test``. See `benchmarks.run` for the command line.
"""

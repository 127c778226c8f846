"""Benchmarks: ``python -m kdexp.bench kd1|kd2|kd3 [options] [OVERRIDES...]`` prints one JSON object.

One module per bench (kd1, kd2, kd3, kd4), each a function returning that object; ``common`` holds the one
compose/setup helper they share and the watcher that times and measures the user's own path (``kdexp.main.run`` in
process, ``python -m kdexp`` in a child); the kd1 bench adds the real commands' memory (``memory``), per-run fixed
costs (``overhead``) and a sweep cached vs online (``sweep``). Timings are ratios measured inside one process or
between processes run one after the other; nothing here asserts a timing.
"""

"""``python -m kdexp.cache build OVERRIDES``: build, ahead of a sweep, every content-addressed artefact its runs need
from the teacher (prepared teacher, teacher answers, logit caches, teacher evaluation), so that no run of the sweep
loads the teacher. docs/sweeps_and_report.md, "Building the caches before a sweep"."""

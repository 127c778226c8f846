"""``python -m kdexp.fair_compare [OPTIONS] [OVERRIDES]``: the entry of :mod:`kdexp.experiments.fair_compare`."""

from kdexp.experiments.fair_compare import main

if __name__ == "__main__":
    main()

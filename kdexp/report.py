"""``python -m kdexp.report DIR [DIR ...]``: the command-line entry of :mod:`kdexp.analysis.report`."""

from kdexp.analysis.report import main

if __name__ == "__main__":
    main()

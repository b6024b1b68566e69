"""DVC stage scripts, run as modules from the repository root: ``python -m stages.<name>``.

Running them with ``-m`` puts the working directory first on ``sys.path``, so a stage imports the
``medpipe`` package of the checkout it runs in (a queued or temporary DVC experiment's own copy), not
the one the editable install points at.
"""

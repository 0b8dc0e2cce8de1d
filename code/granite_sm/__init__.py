"""Client-side helpers for deploying and calling the Granite 4.0 H micro container on SageMaker.

Each module is importable (the notebook does `sys.path.insert(0, "code")`) and runnable as a module
from code/ (`cd code && python -m granite_sm.deploy --help`) or with `PYTHONPATH=code`; none edits sys.path.
The package lives under code/ (not as `code` itself) because a package named `code` would shadow the
standard library's `code` module.
"""

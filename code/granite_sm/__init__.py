"""Client-side helpers for deploying and calling the Granite 4.0 H micro container on SageMaker.

Each module is importable (the notebook does `sys.path.insert(0, "code")`) and runnable as a script:
`python code/granite_sm/deploy.py --help` or `PYTHONPATH=code python -m granite_sm.deploy --help`.
The package lives under code/ (not as `code` itself) because a package named `code` would shadow the
standard library's `code` module.
"""

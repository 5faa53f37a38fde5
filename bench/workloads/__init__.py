"""The workloads of bench/compare.py, one module each: training, inference, tagging, components
(``--profile``) and the input pipeline; with the settings they share, the synthetic data and its
FLOPs, the child-process protocol, the table's rows and the report.

bench/ holds scripts run as ``python bench/NAME.py``: Python puts bench/ first on the import path,
so they import this package as ``workloads``. ``mufun_jax`` (and its torch reference,
``mufun_jax.testing.torch_reference``) must be importable: installed, or the repository on
``PYTHONPATH`` as ``make bench`` does. Nothing in bench/ edits ``sys.path``."""

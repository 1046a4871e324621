"""pcrl: PCRLv2 self-supervised pretraining of 3D medical-image encoders at cluster scale.

Modules follow the data flow: ``config`` → ``data`` → ``views`` → ``model`` → ``objective`` → ``engine``
(with ``distributed``, ``checkpoint`` and ``tracking``). Importing the package loads nothing heavy.
"""

__version__ = "0.1.0"

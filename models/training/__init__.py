"""Training the reference networks and generating their synthetic data. Needs the ``train``
extra (torch); the node never imports this package."""

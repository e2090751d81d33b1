"""Training the reference networks (``networks``, ``train``: the ``train`` extra, torch) and the
synthetic phantoms they learn from (``phantoms``: numpy and pydicom only, also used by the tests,
the benchmarks and the README's first study). The node never imports this package."""

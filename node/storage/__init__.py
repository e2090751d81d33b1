"""Storage: the database and its schema, the object store, the index, the model registry,
dataset validation and crash recovery."""

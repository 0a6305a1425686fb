"""Application services: use cases that combine the record, the stores and the keys."""

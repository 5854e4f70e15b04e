"""agepipe: age and gender classifiers on frozen ArcFace embeddings."""
__version__ = "0.1.0"

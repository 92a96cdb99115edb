"""The process beneath the models, set up the same way for training and serving: the C heap
(``host.malloc``) and the torch device (``host.device``). Imports neither ``app`` nor ``training``."""

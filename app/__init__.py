"""fusionserve's HTTP service: ``create_app(settings)`` builds it, ``python -m app`` runs it."""

__version__ = "0.1.0"

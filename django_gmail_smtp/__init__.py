"""Send a Django site's mail through Gmail and Google Workspace SMTP."""

__version__ = "0.1.0"

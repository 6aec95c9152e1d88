# Load the Celery app whenever Django starts, so tasks are sent with it (shared_task).
from .celery import app as celery_app

__all__ = ("celery_app",)

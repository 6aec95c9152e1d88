"""Newsletters sent within Gmail's limits (an optional sub-app).

Add ``"django_gmail_smtp.newsletters"`` to ``INSTALLED_APPS`` (after ``"django_gmail_smtp"``),
``path("newsletters/", include("django_gmail_smtp.newsletters.urls"))`` to the URLconf, and
``django_gmail_smtp.newsletters.tasks.beat_schedule()`` to the Celery beat schedule. A site that
sends only transactional mail leaves it out and gets none of its tables.
"""

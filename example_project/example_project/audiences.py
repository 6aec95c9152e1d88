"""Audiences a campaign may go to instead of a list (GMAIL_SMTP["NEWSLETTER_AUDIENCES"]).

Each is a callable returning a queryset of a model with an ``email`` field; the campaign takes
it when it starts (so it reaches whoever matches then).
"""

from django.contrib.auth import get_user_model
from django.db.models import QuerySet


def active_users() -> QuerySet:
    """Every active user of the site who has an email address."""
    return get_user_model().objects.filter(is_active=True).exclude(email="")

"""The newsletters' admin: lists (with CSV import), subscribers, campaigns, recipients and the
suppression list.

- ``lists``: :class:`MailingListAdmin` (subscriber counts, Import CSV), :class:`SubscriberAdmin`,
  :class:`SuppressionAdmin`;
- ``campaigns``: :class:`CampaignAdmin` (form, progress, buttons) and the read-only
  :class:`CampaignRecipientAdmin`;
- ``views``: the pages behind the buttons (import, preview, test send, start, pause, resume,
  cancel, retry failed); ``widgets``: the progress bar.

Every operation is a call into the sub-app's services (:mod:`..imports`, the campaign's
lifecycle methods, :mod:`..render`). Every changelist accepts only the query-string filters it
offers; every button needs its permission and a POST.
"""

from __future__ import annotations

from django.contrib import admin

from ..models import Campaign, CampaignRecipient, MailingList, Subscriber, Suppression
from .campaigns import CampaignAdmin, CampaignForm, CampaignRecipientAdmin
from .lists import MailingListAdmin, SubscriberAdmin, SuppressionAdmin
from .widgets import render_progress

admin.site.register(MailingList, MailingListAdmin)
admin.site.register(Subscriber, SubscriberAdmin)
admin.site.register(Campaign, CampaignAdmin)
admin.site.register(CampaignRecipient, CampaignRecipientAdmin)
admin.site.register(Suppression, SuppressionAdmin)

__all__ = [
    "CampaignAdmin",
    "CampaignForm",
    "CampaignRecipientAdmin",
    "MailingListAdmin",
    "SubscriberAdmin",
    "SuppressionAdmin",
    "render_progress",
]

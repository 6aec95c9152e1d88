"""What every newsletter admin shares: the query-string guard, permissions, extra pages."""

from __future__ import annotations

from collections.abc import Callable
from functools import update_wrapper
from typing import Any

import django
from django.contrib import admin
from django.core.exceptions import PermissionDenied
from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404
from django.utils.html import escape

from ...admin.lookups import OfferedLookupsOnly

APP = "gmail_smtp_newsletters"


class NewsletterModelAdmin(OfferedLookupsOnly, admin.ModelAdmin):
    """A ModelAdmin of the sub-app: filters only as offered, the app's stylesheets."""

    class Media:
        css = {"all": ["django_gmail_smtp/admin.css", "gmail_smtp_newsletters/admin.css"]}

    def formfield_for_dbfield(self, db_field: Any, request: HttpRequest, **kwargs: Any) -> Any:
        field = super().formfield_for_dbfield(db_field, request, **kwargs)
        if field is not None and field.help_text:
            # The admin renders help texts as HTML; these speak of addresses like
            # 'News <news@example.com>', which must show, not vanish as a tag.
            field.help_text = escape(field.help_text)
        return field

    def require(self, request: HttpRequest, codename: str) -> None:
        """Raise PermissionDenied unless the user has ``gmail_smtp_newsletters.<codename>``."""
        if not request.user.has_perm(f"{APP}.{codename}"):
            raise PermissionDenied

    def viewable(self, request: HttpRequest, object_id: str) -> Any:
        """The object, if the user may at least view it (else 403; 404 if there is none)."""
        if not self.has_view_permission(request):
            raise PermissionDenied
        return get_object_or_404(self.model, pk=object_id)

    def bind(self, view: Callable[..., HttpResponse]) -> Callable[..., HttpResponse]:
        """``view(model_admin, request, ...)`` as an admin page (login, staff, no caching)."""

        def bound(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
            return view(self, request, *args, **kwargs)

        return self.admin_site.admin_view(update_wrapper(bound, view))

    def page_context(self, request: HttpRequest, title: str, obj: Any = None) -> dict[str, Any]:
        """The context an extra page's template needs for the admin's header and breadcrumbs."""
        return {
            **self.admin_site.each_context(request),
            "title": title,
            "opts": self.model._meta,
            "original": obj,
            # Django < 6.1: breadcrumbs are a div; from 6.1 an ordered list.
            "gms_list_breadcrumbs": django.VERSION >= (6, 1),
        }

"""Changelists that accept from the query string only the filters they offer."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

from django.http import HttpRequest

if TYPE_CHECKING:
    from django.contrib import admin

    # A mixin for ModelAdmin: type-check it as one (at runtime it is a plain object).
    _ModelAdminBase = admin.ModelAdmin[Any]
else:
    _ModelAdminBase = object


class OfferedLookupsOnly(_ModelAdminBase):
    """Changelist filters from the query string only as the admin offers them.

    Django allows any lookup on a local field (``?mime__regex=``, ``?app_password__startswith=``),
    which lets a viewer probe values they cannot see, one character at a time. Here a lookup
    is allowed only if a ``list_filter`` or the ``date_hierarchy`` would produce it; any other
    gets Django's 400 (``DisallowedModelAdminLookup``).
    """

    def offered_lookups(self, request: HttpRequest | None) -> frozenset[str]:
        """The query-string parameters this changelist's own filters use."""
        # Django < 5.0 gives no request here; get_list_filter() and the filters accept None.
        request = cast("HttpRequest", request)
        list_filter = tuple(self.get_list_filter(request))
        key = (list_filter, self.date_hierarchy)
        cache = self.__dict__.setdefault("_gms_offered_lookups", {})
        if key not in cache:
            # Filter specs of relations query their choices: build them once, not per request.
            cache[key] = frozenset(self._filter_parameters(request, list_filter))
        return cache[key]

    def _filter_parameters(self, request: HttpRequest, list_filter: tuple) -> set[str]:
        from django.contrib.admin.filters import FieldListFilter, ListFilter
        from django.contrib.admin.utils import get_fields_from_path

        offered: set[str] = set()
        for item in list_filter:
            if isinstance(item, type) and issubclass(item, ListFilter):
                spec = item(request, {}, self.model, self)
            else:
                path, factory = item if isinstance(item, (list, tuple)) else (item, None)
                field = get_fields_from_path(self.model, path)[-1]
                factory = factory or FieldListFilter.create
                spec = factory(field, request, {}, self.model, self, field_path=path)
            offered.update(p for p in spec.expected_parameters() if p is not None)
        if self.date_hierarchy:
            parts = ("year", "month", "day", "gte", "lt")
            offered.update(f"{self.date_hierarchy}__{part}" for part in parts)
        return offered

    # Django < 5.0 calls lookup_allowed(lookup, value) without the request.
    def lookup_allowed(self, lookup: str, value: Any, request: HttpRequest | None = None) -> bool:
        return (
            lookup in self.offered_lookups(request)
            and self._date_part_valid(lookup, value)
            and self._id_valid(lookup, value)
        )

    def _id_valid(self, lookup: str, value: Any) -> bool:
        # Django < 5.0 passes an out-of-range id to SQLite, which raises OverflowError (a 500
        # for `?account__id__exact=99999999999999999999999`); no row has such an id.
        if lookup == "pk" or lookup.endswith(("__id__exact", "__pk__exact", "id__exact")):
            text = str(value)
            return not text.isdecimal() or int(text) < 2**63
        return True

    def _date_part_valid(self, lookup: str, value: Any) -> bool:
        # Django turns date_hierarchy parts into datetime() and catches only ValueError, so
        # `?created_at__year=99999999999999999999` would be a 500 (OverflowError).
        ranges = {"year": (1000, 9998), "month": (1, 12), "day": (1, 31)}
        for part, (low, high) in ranges.items():
            if self.date_hierarchy and lookup == f"{self.date_hierarchy}__{part}":
                text = str(value)
                return len(text) <= 4 and text.isdecimal() and low <= int(text) <= high
        return True

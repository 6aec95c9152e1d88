"""A module that fails at import, for the NEWSLETTER_AUDIENCES check's test."""

raise RuntimeError("this audience module is broken on purpose")

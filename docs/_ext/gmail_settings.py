"""Sphinx extension: the settings reference, generated from the code.

Two directives, for MyST (Markdown) pages:

- ``gmail-settings`` renders every key of ``django_gmail_smtp.conf.DEFAULTS`` (name, default
  as the code has it, what a valid value is, the lower-case ``MAILERS`` option when a backend
  accepts one, and a description) as a ``gmailsetting`` object, so pages link to a key with
  ``{gmailsetting}`NAME``` and a renamed or removed key breaks the build (``nitpicky``).
- ``gmail-backend-options`` renders the backends' keyword-only constructor arguments that are
  not settings keys (``account``, ``username``, ``password``, ...), read from their signatures.

Descriptions of the keys come from ``conf.SETTINGS`` (the declarative table the app validates
with); the backends' own arguments are described in :data:`BACKEND_ARGUMENTS` below.
``tests/test_docs.py`` fails when the code and the documentation disagree.
"""

from __future__ import annotations

import inspect
import json
import os
import re
from typing import Any

from docutils.parsers.rst import Directive
from docutils.statemachine import StringList
from sphinx.application import Sphinx
from sphinx.util import logging

logger = logging.getLogger(__name__)

#: keyword-only backend arguments that are not GMAIL_SMTP keys -> description
BACKEND_ARGUMENTS: dict[str, str] = {
    "alias": "Set by Django 6.1 to the `MAILERS` alias; never give it in `OPTIONS`.",
    "account": "Send every message from this account's address (an active `GmailAccount`), "
    "whatever the From.",
    "username": "Log in as this address (Django's `auth_user`). With a `password` it is an "
    "App Password login that is never stored; without one, the active `GmailAccount` of that "
    "address. Empty: route by From as usual.",
    "password": "The App Password for `username` (Django's `auth_password`).",
    "use_tls": 'Django compatibility: `True` means `security="starttls"`.',
    "use_ssl": 'Django compatibility: `True` means `security="ssl"`.',
    "using": "`CeleryGmailBackend` only: the database alias the outbox row is written to "
    "(default: the default database).",
}


def _py(value: Any) -> str:
    """A default as Python source, with double-quoted strings (as in settings files)."""
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_py(k)}: {_py(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        inner = ", ".join(_py(v) for v in value)
        return f"[{inner}]" if isinstance(value, list) else f"({inner})"
    return repr(value)


def backend_keyword_arguments() -> list[str]:
    """Keyword-only arguments of both backends' constructors, in signature order."""
    from django_gmail_smtp.backends import CeleryGmailBackend, GmailSMTPBackend

    names: list[str] = []
    for cls in (GmailSMTPBackend, CeleryGmailBackend):
        for param in inspect.signature(cls.__init__).parameters.values():
            if param.kind is inspect.Parameter.KEYWORD_ONLY and param.name not in names:
                names.append(param.name)
    return names


def mailer_options() -> set[str]:
    """Lower-case option names a backend accepts for GMAIL_SMTP keys (MAILERS OPTIONS)."""
    from django_gmail_smtp import backends, conf

    names = {n.lower() for n in getattr(backends, "OPTION_NAMES", ())}
    names |= {n for n in backend_keyword_arguments() if n.upper() in conf.DEFAULTS}
    return names


def backend_only_arguments() -> list[str]:
    """Backend keyword arguments that are not GMAIL_SMTP keys."""
    from django_gmail_smtp import conf

    return [n for n in backend_keyword_arguments() if n.upper() not in conf.DEFAULTS]


def settings_rows() -> list[tuple[str, Any, Any]]:
    """``(name, default, spec)`` for every key of ``conf.DEFAULTS``, in order.

    ``spec`` is the key's ``conf.SETTINGS`` entry (its description and what a valid value
    is), or None when the code has no entry for it (the build then fails).
    """
    from django_gmail_smtp import conf

    specs = getattr(conf, "SETTINGS", {})
    return [(name, default, specs.get(name)) for name, default in conf.DEFAULTS.items()]


def documented_keys() -> set[str]:
    """Keys the code describes (``conf.SETTINGS``)."""
    from django_gmail_smtp import conf

    return set(getattr(conf, "SETTINGS", {}))


_MARKDOWN_SPECIAL = re.compile(r"([\\`*_\[\]<>{}|#!~$])")


def _plain(text: str) -> str:
    """Code-provided text as literal Markdown (every special character escaped)."""
    return _MARKDOWN_SPECIAL.sub(r"\\\1", " ".join(str(text).split()))


class _MarkdownDirective(Directive):
    has_content = False

    def lines(self) -> list[str]:  # pragma: no cover - overridden
        raise NotImplementedError

    def run(self) -> list:
        from docutils import nodes

        container = nodes.container()
        self.state.nested_parse(StringList(self.lines(), source="gmail_settings"), 0, container)
        return container.children


class SettingsDirective(_MarkdownDirective):
    """Every GMAIL_SMTP key with its default, straight from the code."""

    def lines(self) -> list[str]:
        options = mailer_options()
        out: list[str] = []
        for name, default, spec in settings_rows():
            description = getattr(spec, "description", "")
            if not description:
                # A warning, so -W fails the build, while every other key still renders.
                logger.warning(
                    "GMAIL_SMTP[%r] has no description: add its entry to SETTINGS in "
                    "django_gmail_smtp/conf.py.",
                    name,
                    location=(self.state.document.settings.env.docname, self.lineno),
                )
                description = "(Not described yet.)"
            out += [f"```{{gmailsetting}} {name}", "```", ""]
            facts = [f"Default: `{_py(default)}`"]
            if name.lower() in options:
                facts.append(f'per mailer: `OPTIONS["{name.lower()}"]`')
            if getattr(spec, "secret", False):
                facts.append("a secret: never shown in messages")
            out += ["; ".join(facts) + ".", "", _plain(description), ""]
            expected = getattr(spec, "expected", "")
            if expected:
                out += [f"Give {_plain(expected)}.", ""]
            legacy = getattr(spec, "legacy", None)
            if legacy:
                out += [
                    f"When unset (and `MAILERS` is not defined), Django's `{legacy}` is used.",
                    "",
                ]
        return out


class BackendOptionsDirective(_MarkdownDirective):
    """The backends' own keyword arguments (MAILERS OPTIONS) that are not settings keys."""

    def lines(self) -> list[str]:
        out = ["| Argument | Meaning |", "| --- | --- |"]
        for name in backend_only_arguments():
            if name not in BACKEND_ARGUMENTS:
                logger.warning(
                    "The backend argument %r is not documented: add it to BACKEND_ARGUMENTS "
                    "in docs/_ext/gmail_settings.py.",
                    name,
                    location=(self.state.document.settings.env.docname, self.lineno),
                )
            out.append(f"| `{name}` | {BACKEND_ARGUMENTS.get(name, '(Not described yet.)')} |")
        return [*out, ""]


class CommandHelpDirective(Directive):
    """``--help`` of a management command (or one subcommand), from its argparse parser."""

    required_arguments = 1
    optional_arguments = 1
    has_content = False

    def run(self) -> list:
        from django.core.management import load_command_class
        from docutils import nodes

        name, *sub = self.arguments
        command = load_command_class("django_gmail_smtp", name)
        parser = command.create_parser("manage.py", name)
        _hide_django_options(parser)
        if sub:
            parser = _subparser(parser, sub[0])
            if parser is None:
                logger.warning(
                    "manage.py %s has no subcommand %r",
                    name,
                    sub[0],
                    location=(self.state.document.settings.env.docname, self.lineno),
                )
                return []
        # Wrapped to a stable width, whatever the terminal that builds the docs.
        columns = os.environ.get("COLUMNS")
        os.environ["COLUMNS"] = "88"
        try:
            text = parser.format_help()
        finally:
            if columns is None:
                os.environ.pop("COLUMNS", None)
            else:
                os.environ["COLUMNS"] = columns
        block = nodes.literal_block(text, text)
        block["language"] = "text"
        return [block]


#: options every Django command has; left out of the rendered help
_DJANGO_OPTIONS = {
    "--version",
    "--verbosity",
    "--settings",
    "--pythonpath",
    "--traceback",
    "--no-color",
    "--force-color",
    "--skip-checks",
}


def _subparser(parser: Any, name: str) -> Any:
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices.get(name)
    return None


def _hide_django_options(parser: Any) -> None:
    """Leave Django's common options out of the usage line and the option list."""
    import argparse

    for action in parser._actions:
        if _DJANGO_OPTIONS.intersection(action.option_strings):
            action.help = argparse.SUPPRESS


def _always_regenerate(app: Sphinx, env: Any, added: Any, changed: Any, removed: Any) -> list:
    """Pages generated from the code are re-read on every build, so an edit of the code shows
    up without ``-E``."""
    return [doc for doc in ("settings", "commands") if doc in env.found_docs]


def setup(app: Sphinx) -> dict[str, Any]:
    app.add_object_type(
        "gmailsetting",
        "gmailsetting",
        indextemplate="pair: %s; GMAIL_SMTP setting",
        objname="GMAIL_SMTP setting",
    )
    app.add_directive("gmail-settings", SettingsDirective)
    app.add_directive("gmail-backend-options", BackendOptionsDirective)
    app.add_directive("command-help", CommandHelpDirective)
    app.connect("env-get-outdated", _always_regenerate)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}

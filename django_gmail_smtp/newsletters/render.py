"""A campaign's messages: its templates rendered per recipient, with the headers Gmail asks of
bulk senders.

:class:`Renderer` compiles a campaign's subject, text and HTML templates once and builds one
:class:`~django.core.mail.EmailMultiAlternatives` per recipient, each with:

- ``List-Unsubscribe`` (an HTTPS one-click link and a mailto) and
  ``List-Unsubscribe-Post: List-Unsubscribe=One-Click`` (RFC 8058), plus a visible unsubscribe
  link in the body when the template has none;
- ``List-Id`` (RFC 2919) and its own ``Message-ID`` (Gmail answers ``421 4.7.28`` to many
  messages sharing one).

Absolute links use ``GMAIL_SMTP["SITE_URL"]``, else ``https://`` and the sites framework's
current domain (:func:`site_url`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from email.utils import make_msgid, parseaddr
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlsplit

from django.apps import apps
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.core.mail import EmailMultiAlternatives
from django.template import Context, Engine, TemplateSyntaxError, engines
from django.template.backends.django import DjangoTemplates
from django.urls import get_script_prefix, reverse
from django.utils.html import escape

from ..conf import get_setting
from ..enums import Priority
from . import tokens

if TYPE_CHECKING:
    from django.template import Template

    from .models import Campaign, CampaignRecipient, Subscriber

__all__ = [
    "Renderer",
    "SiteURLNotConfigured",
    "TemplateProblem",
    "archive_url",
    "site_domain",
    "site_url",
    "unsubscribe_url",
]

#: the parts of a campaign that are templates, and how messages name them
PARTS = (("subject", "subject"), ("text", "text"), ("html", "HTML"))
#: the names the context always has; a merge field of the same name does not replace them
RESERVED = frozenset({"subscriber", "campaign", "unsubscribe_url", "archive_url"})
SAMPLE_EMAIL = "subscriber@example.com"


class TemplateProblem(ValueError):
    """A campaign template that does not compile or render; the message names the template
    (subject, text or HTML) and gives Django's error."""

    def __init__(self, part: str, error: Exception | str) -> None:
        self.part = part
        self.error = error
        super().__init__(
            f"The {part} template has an error: {error}. Fix it in the campaign and try again."
        )


class SiteURLNotConfigured(ImproperlyConfigured):
    """Newsletter links need the site's address and there is none to take."""


# --- absolute URLs ------------------------------------------------------------------------------


def site_url() -> str:
    """The base of absolute links in mail, without a trailing slash: ``GMAIL_SMTP["SITE_URL"]``,
    else ``https://`` and the sites framework's current domain."""
    configured = get_setting("SITE_URL")
    if configured:
        return str(configured).rstrip("/")
    if apps.is_installed("django.contrib.sites"):
        from django.contrib.sites.models import Site

        return "https://" + Site.objects.get_current().domain.strip().rstrip("/")
    raise SiteURLNotConfigured(
        "Newsletter mail needs absolute links (unsubscribe, archive, confirm), and neither "
        'GMAIL_SMTP["SITE_URL"] is set nor django.contrib.sites installed. Set '
        'GMAIL_SMTP["SITE_URL"] to your site\'s address, such as "https://www.example.com".'
    )


def site_domain() -> str:
    """The host name of :func:`site_url` (no port), for ``List-Id`` and ``Message-ID``."""
    return (urlsplit(site_url()).hostname or "localhost").lower()


def absolute(path: str) -> str:
    """``path`` (from :func:`~django.urls.reverse`) under :func:`site_url`.

    The script prefix is taken off first: ``SITE_URL`` already says where the site is
    mounted, and a worker (no request) has none while a web request may."""
    prefix = get_script_prefix()
    if path.startswith(prefix):
        path = path[len(prefix) :]
    return f"{site_url()}/{path.lstrip('/')}"


def unsubscribe_url(campaign: Campaign | int, email: str, *, test: bool = False) -> str:
    """The one-click unsubscribe link for this campaign and address (``test``: a test send's
    or preview's link, which unsubscribes nobody)."""
    token = tokens.unsubscribe_token(campaign, email, test=test)
    return absolute(reverse("gmail_smtp_newsletters:unsubscribe", args=[token]))


def archive_url(campaign: Campaign) -> str:
    """The web archive page of this campaign."""
    return absolute(reverse("gmail_smtp_newsletters:archive", args=[campaign.pk]))


def confirm_url(subscriber: Subscriber) -> str:
    """The double opt-in confirmation link for this subscription."""
    token = tokens.confirm_token(subscriber)
    return absolute(reverse("gmail_smtp_newsletters:confirm", args=[token]))


# --- rendering ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class SubscriberData:
    """What the templates see as ``subscriber``: the recipient's snapshot."""

    email: str
    name: str = ""
    fields: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        return self.name or self.email


@dataclass(frozen=True)
class ListData:
    """What the templates see as ``campaign.mailing_list``: plain values, no relations."""

    pk: int | None
    name: str
    slug: str
    from_email: str = ""

    @property
    def id(self) -> int | None:
        return self.pk

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True)
class CampaignData:
    """What the templates see as ``campaign``: its plain values, never the model.

    Templates are written by whoever may edit a campaign and their output is mailed to every
    subscriber and published in the archive. Django templates follow relations and call
    methods without arguments, so the model would let ``{{ campaign.cancel }}`` cancel it and
    ``campaign.recipients...outbound.account`` read the sending account's App Password and its
    other mail (password-reset links)."""

    pk: int | None
    name: str
    from_email: str
    reply_to: str
    audience: str
    mailing_list: ListData | None
    started_at: Any = None
    created_at: Any = None

    @property
    def id(self) -> int | None:
        return self.pk

    def __str__(self) -> str:
        return self.name


def campaign_data(campaign: Campaign) -> CampaignData:
    """The template-safe snapshot of ``campaign``."""
    mailing_list = campaign.mailing_list
    return CampaignData(
        pk=campaign.pk,
        name=campaign.name,
        from_email=campaign.from_email,
        reply_to=campaign.reply_to,
        audience=campaign.audience,
        mailing_list=(
            ListData(mailing_list.pk, mailing_list.name, mailing_list.slug, mailing_list.from_email)
            if mailing_list is not None
            else None
        ),
        started_at=campaign.started_at,
        created_at=campaign.created_at,
    )


def _snapshot(person: Subscriber | CampaignRecipient) -> SubscriberData:
    fields = person.fields if isinstance(person.fields, dict) else {}
    return SubscriberData(person.email, person.name or "", dict(fields))


def template_engine() -> Engine:
    """The site's Django template engine (its libraries and builtins), else a plain one."""
    for backend in engines.all():
        if isinstance(backend, DjangoTemplates):
            return backend.engine
    return Engine()


class Renderer:
    """A campaign's templates, compiled once, rendered per recipient.

    ``Renderer(campaign)`` raises :class:`TemplateProblem` when a template does not compile.
    The HTML is rendered with autoescaping, the subject and text without.
    """

    def __init__(self, campaign: Campaign) -> None:
        self.campaign = campaign
        engine = template_engine()
        sources = {
            "subject": campaign.subject or "",
            "text": campaign.text_template or "",
            "html": campaign.html_template or "",
        }
        self.templates: dict[str, Template | None] = {}
        for key, label in PARTS:
            if key == "html" and not sources[key].strip():
                self.templates[key] = None
                continue
            try:
                self.templates[key] = engine.from_string(sources[key])
            except TemplateSyntaxError as exc:
                raise TemplateProblem(label, exc) from exc
        # A template that links the unsubscribe page itself gets no second link.
        self.text_has_link = "unsubscribe_url" in sources["text"]
        self.html_has_link = "unsubscribe_url" in sources["html"]
        mailing_list = campaign.mailing_list
        self.from_email = (
            campaign.from_email
            or (mailing_list.from_email if mailing_list else "")
            or settings.DEFAULT_FROM_EMAIL
        )
        self._domain: str | None = None
        self._archive_url: str | None = None
        self.campaign_data = campaign_data(campaign)

    def __repr__(self) -> str:
        return f"<Renderer campaign={self.campaign.pk}>"

    # --- per recipient --------------------------------------------------------------------------

    def message(self, recipient: CampaignRecipient) -> EmailMultiAlternatives:
        """The message for one enrolled recipient, marked bulk, ready to queue."""
        return self._message(_snapshot(recipient), recipient.email)

    def test_message(self, email: str) -> EmailMultiAlternatives:
        """A test send to ``email`` (a seed address): subject prefixed ``[Test] ``, rendered
        for that address's subscription on the list if there is one, else a sample."""
        return self._message(self._seed(email), email, subject_prefix="[Test] ", test=True)

    def preview(
        self, subscriber_or_recipient: Subscriber | CampaignRecipient | None = None
    ) -> dict[str, str]:
        """``{"subject", "text", "html"}`` as this subscriber or recipient would get them (a
        sample subscriber when None); ``html`` is "" when the campaign has no HTML."""
        if subscriber_or_recipient is None:
            subscriber = SubscriberData(SAMPLE_EMAIL, "Sample Subscriber", self._sample_fields())
        else:
            subscriber = _snapshot(subscriber_or_recipient)
        # A preview's link is a test link: following it from the admin unsubscribes nobody.
        link = unsubscribe_url(self.campaign, subscriber.email, test=True)
        return self.render(subscriber, link, self.archive_url, add_link=True)

    def archive_page(self) -> dict[str, str]:
        """``{"subject", "text", "html"}`` for the public web archive: a neutral sample
        subscriber (no personal data) and no working unsubscribe link."""
        subscriber = SubscriberData("", "", {})
        return self.render(subscriber, "#", self.archive_url, add_link=False)

    def render(
        self, subscriber: SubscriberData, unsubscribe: str, archive: str, *, add_link: bool
    ) -> dict[str, str]:
        """The three parts for this context; ``add_link``: append a visible unsubscribe link
        to a body whose template does not use ``unsubscribe_url``."""
        values: dict[str, Any] = {
            key: value
            for key, value in subscriber.fields.items()
            if isinstance(key, str) and key not in RESERVED
        }
        values.update(
            subscriber=subscriber,
            campaign=self.campaign_data,
            unsubscribe_url=unsubscribe,
            archive_url=archive,
        )
        subject = self._render("subject", values, autoescape=False)
        # One line: a template's line breaks must not reach the header.
        subject = re.sub(r"\s+", " ", subject).strip()
        text = self._render("text", values, autoescape=False)
        html = self._render("html", values, autoescape=True) if self.templates["html"] else ""
        if add_link and not self.text_has_link:
            text = f"{text.rstrip()}\n\n-- \nUnsubscribe: {unsubscribe}\n"
        if add_link and html and not self.html_has_link:
            html = _add_html_link(html, unsubscribe)
        return {"subject": subject, "text": text, "html": html}

    # --- helpers --------------------------------------------------------------------------------

    @property
    def domain(self) -> str:
        if self._domain is None:
            self._domain = site_domain()
        return self._domain

    @property
    def archive_url(self) -> str:
        if self._archive_url is None:
            self._archive_url = archive_url(self.campaign)
        return self._archive_url

    def list_id(self) -> str:
        """``List-Id``: the list's name and ``slug.domain`` (``campaign-<pk>.domain`` for a
        campaign addressed to a queryset)."""
        mailing_list = self.campaign.mailing_list
        if mailing_list is not None:
            name, ident = mailing_list.name, f"{mailing_list.slug}.{self.domain}"
        else:
            name, ident = self.campaign.name, f"campaign-{self.campaign.pk}.{self.domain}"
        # The phrase must not break the header: no quotes, angle brackets or line breaks.
        name = re.sub(r'[\s"<>\\]+', " ", name).strip()
        return f"{name} <{ident}>" if name else f"<{ident}>"

    def headers(self, email: str, link: str = "", *, test: bool = False) -> dict[str, str]:
        """The per-message headers for ``email``: unsubscribe, List-Id, Message-ID.
        ``link``: its unsubscribe link, when already made; ``test``: a test send's."""
        token = tokens.unsubscribe_token(self.campaign, email, test=test)
        link = link or absolute(reverse("gmail_smtp_newsletters:unsubscribe", args=[token]))
        sender = parseaddr(self.from_email)[1] or self.from_email
        mailto = f"mailto:{sender}?subject={quote('unsubscribe ' + token, safe='')}"
        return {
            "List-Unsubscribe": UnencodedHeader("List-Unsubscribe", f"<{link}>, <{mailto}>"),
            "List-Unsubscribe-Post": "List-Unsubscribe=One-Click",
            "List-Id": self.list_id(),
            "Message-ID": make_msgid(domain=self.domain),
        }

    def _message(
        self,
        subscriber: SubscriberData,
        email: str,
        *,
        subject_prefix: str = "",
        test: bool = False,
    ) -> EmailMultiAlternatives:
        link = unsubscribe_url(self.campaign, email, test=test)
        headers = self.headers(email, link, test=test)
        parts = self.render(subscriber, link, self.archive_url, add_link=True)
        message = EmailMultiAlternatives(
            subject=subject_prefix + parts["subject"],
            body=parts["text"],
            from_email=self.from_email,
            to=[email],
            reply_to=[self.campaign.reply_to] if self.campaign.reply_to else None,
            headers=headers,
        )
        if parts["html"]:
            message.attach_alternative(parts["html"], "text/html")
        # Read by the quota (django_gmail_smtp.quota): campaign mail leaves room for
        # transactional mail.
        message.gmail_priority = Priority.BULK  # type: ignore[attr-defined]
        return message

    def _render(self, key: str, values: dict[str, Any], *, autoescape: bool) -> str:
        template = self.templates[key]
        if template is None:
            return ""
        try:
            return template.render(Context(values, autoescape=autoescape))
        except Exception as exc:  # a filter or tag failing at render time: any exception
            label = dict(PARTS)[key]
            raise TemplateProblem(label, f"{type(exc).__name__}: {exc}") from exc

    def _seed(self, email: str) -> SubscriberData:
        mailing_list = self.campaign.mailing_list
        if mailing_list is not None:
            found = mailing_list.subscribers.filter(email__iexact=email.strip()).first()
            if found is not None:
                return SubscriberData(email, found.name, _snapshot(found).fields)
        return SubscriberData(email, "", self._sample_fields())

    def _sample_fields(self) -> dict[str, str]:
        """Placeholders for the merge fields the list's subscribers have, so a preview or a
        test send shows where each one goes."""
        mailing_list = self.campaign.mailing_list
        if mailing_list is None:
            return {}
        first = mailing_list.subscribers.exclude(fields={}).only("fields").first()
        keys = first.fields.keys() if first is not None and isinstance(first.fields, dict) else ()
        return {key: f"[{key}]" for key in keys}


class UnencodedHeader(str):
    """A header value the email package writes as it is, folded only after its commas.

    The stdlib's folding turns a word longer than a line (such as an unsubscribe URL with
    its token) into RFC 2047 encoded words, which no mail client reads as a URL. The
    ``email`` package keeps a value that has a ``name`` and a ``fold`` method as a ready
    header object, and ``force_str`` (Django's ``message()``) keeps a str subclass as it is.
    """

    name: str

    def __new__(cls, name: str, value: str) -> UnencodedHeader:
        if "\r" in value or "\n" in value:
            raise ValueError(f"The {name} header cannot contain line breaks.")
        header = super().__new__(cls, value)
        header.name = name
        return header

    def fold(self, *, policy: Any) -> str:
        """The header line(s) as ``policy`` writes them (each URL whole on its line)."""
        line = f"{self.name}: {self}"
        if policy.max_line_length and len(line) > policy.max_line_length:
            line = f"{self.name}: " + f",{policy.linesep} ".join(self.split(", "))
        return line + policy.linesep

    # What the email package asks of a header object it did not parse.
    defects: tuple = ()

    def __reduce__(self) -> tuple:
        return (UnencodedHeader, (self.name, str(self)))


def _add_html_link(html: str, link: str) -> str:
    """Put a visible unsubscribe link before ``</body>``, or at the end."""
    snippet = (
        '<p style="font-size:12px;color:#666;text-align:center;margin-top:24px">'
        f'<a href="{escape(link)}" style="color:#666">Unsubscribe</a></p>'
    )
    at = html.lower().rfind("</body>")
    if at == -1:
        return f"{html}\n{snippet}\n"
    return f"{html[:at]}{snippet}\n{html[at:]}"

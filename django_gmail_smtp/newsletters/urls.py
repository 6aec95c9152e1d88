"""The newsletters' public pages: ``include("django_gmail_smtp.newsletters.urls")``.

Subscribe form per list, double opt-in confirmation, one-click unsubscribe (RFC 8058) and
the web archive of each campaign.
"""

from django.urls import path

from . import views

app_name = "gmail_smtp_newsletters"
urlpatterns = [
    path("subscribe/<slug:slug>/", views.subscribe, name="subscribe"),
    path("confirm/<str:token>/", views.confirm, name="confirm"),
    path("unsubscribe/<str:token>/", views.unsubscribe, name="unsubscribe"),
    path("archive/<int:pk>/", views.archive, name="archive"),
]

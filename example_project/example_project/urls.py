from django.contrib import admin
from django.urls import include, path

urlpatterns = [
    path("", include("contact.urls")),
    # login, logout and the password reset views (templates in templates/registration/)
    path("accounts/", include("django.contrib.auth.urls")),
    # subscribe form, confirmation, one-click unsubscribe, web archive of each campaign
    path("newsletters/", include("django_gmail_smtp.newsletters.urls")),
    path("admin/", admin.site.urls),
]

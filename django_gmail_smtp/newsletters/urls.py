from django.urls import path

app_name = "gmail_smtp_newsletters"
urlpatterns: list = []

app_name = "gmail_smtp_newsletters"
urlpatterns: list = []

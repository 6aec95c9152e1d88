# The sandbox's pytest fixtures (gmail_sandbox, gmail_sandbox_ssl), in the project's root
# conftest.py.
pytest_plugins = ["django_gmail_smtp.testing.pytest_plugin"]

"""What the newsletters do when the outbox reports on one of their messages."""

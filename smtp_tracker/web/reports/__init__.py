"""The authenticated reports listener: the JSON API, the dashboard and their logins."""

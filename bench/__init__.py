"""``msixhub bench NAME``: each benchmark prints our figure, a bare baseline run the same way, and their ratio."""

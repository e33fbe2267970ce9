"""The clrsearch worker: pulls trials from the server, trains them and reports back."""

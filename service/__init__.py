"""The clrsearch server: REST API, worker protocol, database and Optuna wiring.

Public surface: `service.app.create_app` and `service.settings.ServerSettings`.
"""

"""``python -m appliance.cli`` runs ``qkdn`` (used by the supervisor to start nodes)."""

from appliance.cli import run

run()

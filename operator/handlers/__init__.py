"""What the Kopf wrappers in main.py call: orchestration of verification, agents and status."""

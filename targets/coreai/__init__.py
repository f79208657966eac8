"""Apple targets (macos, ios): Core AI assets (.aimodel) from the plan; see target.py."""

"""Pure-Python scheduling: requests, pages, policy. Imports no torch and no ray."""

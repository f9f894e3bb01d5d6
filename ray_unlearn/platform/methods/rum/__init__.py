"""RUM: memorization-aware approximate unlearning and its memorization scores."""

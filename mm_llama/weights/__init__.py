"""Weight loading for the frozen LM: declarative key tables per source format."""

"""Session-scoped run folders written by the real trainer, for the readers (status, watch, doctor, report)."""

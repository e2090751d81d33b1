"""Operations: the audit log, Prometheus metrics, logging and systemd integration."""

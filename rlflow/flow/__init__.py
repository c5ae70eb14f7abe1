"""flow — orchestration: launch role services, wire them to the bus, control staleness."""

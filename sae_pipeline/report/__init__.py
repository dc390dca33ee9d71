"""What a person reads: figure writing, markdown tables, the results summary and its HTML page, the plots."""

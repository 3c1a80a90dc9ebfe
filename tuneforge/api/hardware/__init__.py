"""`GET /hardware` and `GET /clusters/availability-zones` (api-contract 5.1, 5.2): what this host can run dedicated
endpoints on."""

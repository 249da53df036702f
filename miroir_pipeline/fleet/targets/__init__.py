"""Node targets: local node store and Meilisearch nodes."""

"""Root conftest: registers the fixtures that start real services (Postgres, Meilisearch,
Pushgateway) for the test suite. Each fixture module starts and stops its own processes."""

pytest_plugins = [
    "tests.fixtures.postgres",
    "tests.fixtures.meilisearch",
    "tests.fixtures.pushgateway",
]

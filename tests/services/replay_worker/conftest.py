from tests.services.router.conftest import config_path  # noqa: F401  (a shared fixture)

def pytest_addoption(parser):
    parser.addoption(
        "--update-golden",
        action="store_true",
        default=False,
        help="rewrite the golden trajectory fixtures in tests/golden/ instead of comparing with them",
    )

"""``python -m link_kernel``: run the Link kernel (``-f CONNECTION_FILE``)."""

from .app import main

if __name__ == "__main__":
    main()

"""Database engines under the SQL stores: the connection Protocol every engine speaks
(``connection``), the versioned schema machinery (``schema``), SQLite (``sqlite``),
PostgreSQL (``postgres``), and the worker threads their blocking drivers run in
(``threads``). The stores above (``stores/sql.py``) say what to keep; these say how
a statement reaches a database."""
